#!/usr/bin/env bash
# On the GPU machine, from the repo root: export cost (time, peak RSS), calibration throughput and MFU at sequence
# 8192, and the chunk-step times, for a LLaMA-3.2-1B-shaped random model and for SmolLM2-135M. Ends within
# BUDGET seconds (default 530): every step gets a timeout from what is left; a step that does not fit is skipped.
#   bash benchmarks/gpu_shapes.sh                           (results under $OUT, work under /tmp/w1b)
#   SHAPE=tiny DEVICE=cpu bash benchmarks/gpu_shapes.sh     (the same steps on the CPU with a tiny model)
#   PARTS=chunk bash benchmarks/gpu_shapes.sh               (only some of: calib export chunk; models in $W are reused)
#   FORM_SWITCH=FWCONVERT_EXPERIMENT_X bash benchmarks/gpu_shapes.sh   (an export-form experiment, as in gpu_export.sh:
#                                        the shape's base graph also as base-x with the switch at 1, the others at 0;
#                                        FORM_X="ttt" (any of base fwl ttt) names the graphs exported so instead)
# $OUT gets shapes-export.jsonl (benchmarks/export_cost.py), shapes-calib.jsonl (benchmarks/calib_throughput.py),
# shapes.md (summary table), shapes.log (this script's output), chunk-step-1b.md/.json (benchmarks/chunk_step.py).
set -uo pipefail
export PYTHONPATH=/tmp/fw-site:$PWD PYTHONUNBUFFERED=1
SHAPE=${SHAPE:-llama1b}; DEVICE=${DEVICE:-cuda}; OUT=${OUT:-/tmp/out}; BUDGET=${BUDGET:-530}
G=${GGUF:-/tmp/fw-assets/SmolLM2-135M-Instruct.Q4_1.gguf}; TOK=${TOK:-$G}   # TOK: tokenizer for the shape model
if [ "$SHAPE" = llama1b ]; then W=${W:-/tmp/w1b}; else W=${W:-/tmp/w-$SHAPE}; fi
if [ "$DEVICE" = cpu ]; then STEPS=${STEPS:-2}; SEQ=${SEQ:-1024}; else STEPS=${STEPS:-8}; SEQ=${SEQ:-8192}; fi
SMOL=${SMOL:-1}; [ -f "$G" ] || SMOL=0; PARTS=${PARTS:-calib export chunk}   # SmolLM2 part only where its GGUF is
mkdir -p "$W/logs" "$OUT"
rm -f "$OUT"/shapes-export.jsonl "$OUT"/shapes-calib.jsonl "$OUT"/shapes.md "$OUT"/shapes.log
T0=$SECONDS
left() { echo $((BUDGET - (SECONDS - T0))); }
cap() { local l=$(($(left) - ${2:-0})); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo $l; }  # min(S, left-R)
t() {  # [-l LOG] CMD...: echo, run (output into LOG if given), time; on failure the last lines of LOG
  local log="" s=$SECONDS rc
  [ "$1" = -l ] && { log=$2; shift 2; }
  echo "+ $*"
  if [ -n "$log" ]; then "$@" > "$log" 2>&1; else "$@"; fi
  rc=$?
  echo "  (rc $rc, $((SECONDS - s)) s, $(left) s left) ${log:+log $log}"
  [ $rc = 0 ] || [ -z "$log" ] || tail -n 4 "$log" | sed 's/^/    /'
  return $rc
}
main() {  # everything below, its output also into $OUT/shapes.log (a pipe, not exec > >(tee): wait would wait for tee)
echo "parts $PARTS; shape $SHAPE, device $DEVICE, steps $STEPS (+2 warm-up), seq $SEQ, SmolLM2 $SMOL, work $W"
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc; free -g | head -2

# 1. Setup (not measured): calibration documents, the random shape model, its FWL / in-place TTT conversions,
#    the SmolLM2 conversions when /tmp/w has none (benchmarks/gpu_calibrate.sh makes them with the same flags).
[ -d "$W/docs" ] || python3 benchmarks/copy_docs.py "$W/docs" --min-bytes 40000
SF=/tmp/w/fwl; ST=/tmp/w/ttt
if [ "$SMOL" = 1 ]; then
  [ -d $SF ] || SF=$W/smol-fwl
  [ -d $ST ] || ST=$W/smol-ttt
  [ -d $SF ] || t -l $W/logs/smol-fwl.log timeout $(cap 120) python3 -m fwconvert add-fwl "$G" -o $SF --chunk-size 512 &
  [ -d $ST ] || t -l $W/logs/smol-ttt.log timeout $(cap 120) python3 -m fwconvert mark-fast "$G" -o $ST --chunk-size 512 &
fi
if [ ! -f $W/base/config.json ]; then
  rm -rf $W/base.tmp
  t timeout $(cap 150) python3 benchmarks/make_shape_model.py $W/base.tmp --shape $SHAPE --dtype bf16 \
    --tokenizer-from "$TOK" && mv $W/base.tmp $W/base
fi
[ -d $W/fwl ] || t -l $W/logs/fwl.log timeout $(cap 150) python3 -m fwconvert add-fwl $W/base -o $W/fwl --chunk-size 512 &
[ -d $W/ttt ] || t -l $W/logs/ttt.log timeout $(cap 150) python3 -m fwconvert mark-fast $W/base -o $W/ttt \
  --chunk-size 512 &
wait

# 2. Calibration throughput at sequence $SEQ (GPU; one run at a time): $STEPS timed updates after 2 warm-up ones.
calib() {  # label model [more calib_throughput.py flags]
  [ -d "$2" ] || { echo "  skip calibrate $1: no $2"; return; }
  [ "$(left)" -gt 60 ] || { echo "  skip calibrate $1: $(left) s left"; return; }
  t -l $W/logs/calib-$1.log timeout $(cap 120 40) python3 benchmarks/calib_throughput.py "$2" --data $W/docs \
    --steps $STEPS --warmup-steps 2 --seq-len $SEQ --device $DEVICE --label "$1" --json-out "$OUT/shapes-calib.jsonl" "${@:3}"
  tail -n 1 $W/logs/calib-$1.log
}
if [[ " $PARTS " = *" calib "* ]]; then
  calib fwl-$SHAPE $W/fwl; calib ttt-$SHAPE $W/ttt; calib ttt-$SHAPE-fp32 $W/ttt --no-tf32
  [ "$SMOL" = 1 ] && { calib fwl-smollm2 $SF; calib ttt-smollm2 $ST; }
fi

# 3. Export cost: the three fp16 graphs of a model at once, 4 threads each, each child's time and peak RSS.
export_all() {  # DIRPREFIX LABELSUFFIX name=src ...: graphs go to $W/<DIRPREFIX><name>-fp16
  local pre=$1 suf=$2 limit; shift 2
  [ "$(left)" -gt 60 ] || { echo "  skip exports $pre*: $(left) s left"; return; }
  limit=$(cap 300 30)
  for pair in "$@"; do
    local name=${pair%%=*} src=${pair#*=}
    [ -e "$src" ] || { echo "  skip export $pre$name: no $src"; continue; }
    local sw=(); [ -n "${FORM_SWITCH:-}" ] && sw=("$FORM_SWITCH=$([[ $name == *-x ]] && echo 1 || echo 0)")
    OMP_NUM_THREADS=4 t env "${sw[@]}" python3 benchmarks/export_cost.py --label "$name-$suf" --timeout $limit \
      --json-out "$OUT/shapes-export.jsonl" --log $W/logs/export-$pre$name.log -- \
      python3 -m fwconvert export-onnx "$src" -o $W/$pre$name-fp16 --chunk-size 512 --dtype fp16 --force &
  done
  wait
  for pair in "$@"; do
    local n=${pair%%=*}
    [ -f $W/$pre$n-fp16/manifest.json ] || { echo "  export $pre$n: no graph:"; tail -n 4 $W/logs/export-$pre$n.log; }
  done
}
if [[ " $PARTS " = *" export "* ]]; then
  x=(); [ -n "${FORM_SWITCH:-}" ] && for n in ${FORM_X:-base}; do x+=("$n-x=$W/$n"); done
  export_all "" $SHAPE base=$W/base fwl=$W/fwl ttt=$W/ttt "${x[@]}"
  [ "$SMOL" = 1 ] && export_all smol- smollm2 base="$G" fwl=$SF ttt=$ST
fi

# 4. Chunk-step times of the 1B graphs (benchmarks/chunk_step.py, once it has --hf).
if [[ " $PARTS " != *" chunk "* ]]; then
  :
elif [ "$DEVICE" = cpu ]; then
  echo "  skip chunk_step.py: needs CUDA"
elif ! python3 benchmarks/chunk_step.py --help 2>/dev/null | grep -q -- --hf; then
  echo "  skip chunk_step.py: no --hf option yet"
elif [ "$(left)" -lt 60 ]; then
  echo "  skip chunk_step.py: $(left) s left"
else
  x=(); for n in base fwl ttt; do [ -f $W/$n-x-fp16/manifest.json ] && x+=(--graph $n-x=$W/$n-x-fp16); done
  (cd benchmarks && t timeout $(cap 600 10) python3 chunk_step.py --hf $W/base --graph base=$W/base-fp16 \
     --graph fwl=$W/fwl-fp16 --graph ttt=$W/ttt-fp16 "${x[@]}" --out-md $OUT/chunk-step-1b.md --out-json $OUT/chunk-step-1b.json)
fi

# 5. Summary table.
python3 - "$OUT" <<'PY' | tee "$OUT/shapes.md"
import json, os, sys
def rows(name):
    p = os.path.join(sys.argv[1], name)
    return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []
print("| export (fp16, C = 512) | s | peak RSS GB | rc |\n|---|---|---|---|")
for r in rows("shapes-export.jsonl"):
    print(f"| {r['label']} | {r['seconds']:.1f} | {r['peak_rss_mb'] / 1024:.2f} | {r['rc']} |")
print("\n| calibration (--train fast) | seq | tokens/s (steady) | tokens/s (manifest) | GFLOP/token | MFU vs measured "
      "| MFU vs 989 TFLOP/s | GPU mem GB |\n|---|---|---|---|---|---|---|---|")
for r in rows("shapes-calib.jsonl"):
    mfu = f"{r['mfu']:.3f} (of {r['peak_tflops']:.0f} TFLOP/s)" if "mfu" in r else "-"
    print(f"| {r['label']} | {r['seq_len']} | {r['tokens_per_second']:,.0f} | {r['tokens_per_second_manifest']:,.0f} "
          f"| {r['flops_per_token'] / 1e9:.2f} | {mfu} | {r['mfu_nominal']:.3f} | {r.get('peak_gpu_mem_gb', '-')} |")
PY
echo "done in $((SECONDS - T0)) s"
}
main 2>&1 | tee "$OUT/shapes.log"
