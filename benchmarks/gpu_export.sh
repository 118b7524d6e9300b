#!/usr/bin/env bash
# On the GPU machine, after gpu_calibrate.sh: export base / FWL / in-place graphs (fp32 and fp16, C = 512),
# verify them on the CUDA provider, check fp16 perplexity on an 8k-token document, then the chunk-step benchmark.
#   PART=export|verify|bench|all  MODELS='fwl ttt'  DTYPES='fp32 fp16'  BASE=1   (results under $OUT)
set -uo pipefail
export PYTHONPATH=/tmp/fw-site:$PWD PYTHONUNBUFFERED=1
G=/tmp/fw-assets/SmolLM2-135M-Instruct.Q4_1.gguf; W=/tmp/w; OUT=${OUT:-/tmp/out}; PART=${PART:-all}
t() { local s=$SECONDS; echo "+ $*"; "$@"; local rc=$?; echo "  (rc $rc, $((SECONDS - s)) s)"; return $rc; }
DOC=$(python3 -c "import sysconfig, os; print(os.path.join(sysconfig.get_paths()['stdlib'], 'typing.py'))")
if [ "$PART" = all ] || [ "$PART" = export ]; then
  # exports run on the CPU: in parallel, 3 threads each
  for m in ${MODELS:-fwl ttt}; do for d in ${DTYPES:-fp32 fp16}; do
    OMP_NUM_THREADS=3 t python3 -m fwconvert export-onnx $W/$m-cal -o $W/$m-$d --chunk-size 512 --dtype $d --force > "$OUT/export-$m-$d.log" 2>&1 &
  done; done
  if [ "${BASE:-1}" = 1 ]; then
    OMP_NUM_THREADS=3 t python3 -m fwconvert export-onnx "$G" -o $W/base-fp16 --chunk-size 512 --dtype fp16 --force > "$OUT/export-base-fp16.log" 2>&1 &
  fi
  wait; tail -n 2 "$OUT"/export-*.log
fi
if [ "$PART" = all ] || [ "$PART" = verify ]; then
  for m in ${MODELS:-fwl ttt}; do
    for d in ${DTYPES:-fp32 fp16}; do
      python3 -m fwconvert verify $W/$m-$d --provider cuda --chunks 16 --json > "$OUT/verify-$m-$d.json"
      echo "verify $m $d: rc $?"; python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['passed'], r['worst'])" "$OUT/verify-$m-$d.json"
    done
    if [ -d $W/$m-fp16 ]; then  # fp16 on a real document (random tokens overflow fp16's range: docs/results.md)
      python3 -m fwconvert verify $W/$m-fp16 --provider cuda --chunks 16 --text "$DOC" --json > "$OUT/verify-$m-fp16-text.json"
      echo "verify $m fp16 on $DOC: rc $?"
    fi
    [ -d $W/$m-fp16 ] && t python3 benchmarks/ppl_check.py $W/$m-cal $W/$m-fp16 "$DOC" | tee "$OUT/ppl-$m-fp16.json"
  done
fi
if [ "$PART" = all ] || [ "$PART" = bench ]; then
  t python3 benchmarks/ort_profile.py $W/base-fp16 $W/fwl-fp16 $W/ttt-fp16 --json "$OUT/ort-profile-b1.json"
  t python3 benchmarks/ort_profile.py $W/base-fp16 $W/fwl-fp16 $W/ttt-fp16 --batch 8 --json "$OUT/ort-profile-b8.json"
  cd benchmarks && t python3 chunk_step.py --gguf "$G" --graph base=$W/base-fp16 --graph fwl=$W/fwl-fp16 --graph ttt=$W/ttt-fp16 \
     --doc "$DOC" --out-md "$OUT/chunk-step.md" --out-json "$OUT/chunk-step.json"
fi
