#!/usr/bin/env bash
# On the GPU machine, after gpu_calibrate.sh: which precision policy makes fp16 graphs pass `verify` (logits <= 1e-2)?
# Exports base / FWL / in-place in fp16 under each policy (none: all fp16 with ORT's fused attention; attn: attention
# in fp32; resid: fp32 residual stream), verifies each on the CUDA provider, and runs benchmarks/fp16_diag.py.
#   PART=export|verify  VARIANTS='none attn resid'   (results under $OUT)
set -uo pipefail
export PYTHONPATH=/tmp/fw-site:$PWD PYTHONUNBUFFERED=1
G=/tmp/fw-assets/SmolLM2-135M-Instruct.Q4_1.gguf; W=/tmp/w; OUT=${OUT:-/tmp/out}; PART=${PART:-all}
VARIANTS=${VARIANTS:-none attn resid}; MODELS=${MODELS:-base fwl ttt}
src() { if [ "$1" = base ]; then echo "$G"; else echo "$W/$1-cal"; fi; }
if [ "$PART" = all ] || [ "$PART" = export ]; then
  for m in $MODELS; do for v in $VARIANTS; do
    FWCONVERT_EXPERIMENT_FP16=$v OMP_NUM_THREADS=2 python3 -m fwconvert export-onnx "$(src $m)" -o $W/$m-fp16-$v \
      --chunk-size 512 --dtype fp16 --force > "$OUT/export-$m-fp16-$v.log" 2>&1 &
  done; done
  wait; for f in "$OUT"/export-*-fp16-*.log; do echo "$f: $(tail -n 1 "$f")"; done
fi
if [ "$PART" = all ] || [ "$PART" = verify ]; then
  for m in $MODELS; do for v in $VARIANTS; do
    python3 -m fwconvert verify $W/$m-fp16-$v --provider cuda --chunks 16 --json > "$OUT/verify-$m-fp16-$v.json" 2>/dev/null
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['passed'], r['worst'])" "$OUT/verify-$m-fp16-$v.json" "$m $v"
  done; done
  for m in ${DIAG:-base fwl}; do
    python3 benchmarks/fp16_diag.py $W/$m-fp16-none "$(src $m)" --chunks 16 > "$OUT/fp16-diag-$m.jsonl" 2>/dev/null
    python3 -c "import json,sys; [print(sys.argv[2], d['chunk'], d['ort_fp16_rel'], d['torch_fp16_rel'], d['worst'][0]) for d in map(json.loads, open(sys.argv[1]))]" "$OUT/fp16-diag-$m.jsonl" $m | head -16
  done
fi
