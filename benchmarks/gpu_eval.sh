#!/usr/bin/env bash
# On the GPU machine, after gpu_calibrate.sh: perplexity by position at context 8192 on the held-out files,
# for base, baselines, FWL, in-place TTT and dynamic evaluation, with tokens/s.   (results under $OUT)
set -uo pipefail
export PYTHONPATH=/tmp/fw-site:$PWD PYTHONUNBUFFERED=1
G=/tmp/fw-assets/SmolLM2-135M-Instruct.Q4_1.gguf; W=/tmp/w; OUT=${OUT:-/tmp/out}; DOCS=${DOCS:-24}
t() { local s=$SECONDS; echo "+ $*"; "$@"; local rc=$?; echo "  (rc $rc, $((SECONDS - s)) s)"; return $rc; }
EV=(--data $W/docs --ext .py --context 8192 --chunk-size 512 --device cuda --max-docs "$DOCS" --json)
t python3 -m fwconvert eval $W/fwl-cal "${EV[@]}" --base "$G" --baseline $W/fwl-baseline --dynamic-eval \
   --dynamic-eval-params down_proj --plot "$OUT/fwl-loss-by-position.png" > "$OUT/eval-fwl.json"
t python3 -m fwconvert eval $W/ttt-cal "${EV[@]}" --baseline $W/ttt-baseline --plot "$OUT/ttt-loss-by-position.png" > "$OUT/eval-ttt.json"
head -c 3000 "$OUT/eval-fwl.json"; echo; head -c 2000 "$OUT/eval-ttt.json"
