#!/usr/bin/env bash
# The GPU session in one go, in the background: calibrate (GPU) while every graph exports (CPUs), then the chunk-step
# benchmark and stream_by_chunk.py (alone on the machine), the kernel profiles (and linear_attention_check.py), the
# evaluation (alone: its tokens/s are compared), verify, the 1B-shape chunk step, the 1B calibration throughput (TF32
# off/on) and the GPU-only tests. Each stage uses the scripts beside this one; a failing stage does not stop the next.
#   bash benchmarks/gpu_pipeline.sh start     copies the repo to /tmp/repo and starts (setsid: survives the call)
#   bash benchmarks/gpu_pipeline.sh status    stage log so far; /tmp/out as $OUT/results.tgz (the device's return folder)
# Each `run` call must follow the last within the machine's idle release (30 s): poll with `sleep 240; ... status`.
# Settings (environment): RUNS, STEPS, CONVERT, CONVERT2, RUNS2 (gpu_calibrate.sh), EVALS, ABLATE (gpu_eval.sh), OLD: a folder holding
# an older checkout (outside the repo copy, e.g. /tmp/old: the working tree is re-laid on every call) whose graphs
# OLD_EXPORTS (gpu_export.sh's EXPORTS form; default its window graphs base-w3 fwl-w3 ttt-w3) are exported with it
# and timed beside the new ones,
# NEW: the SmolLM2 graphs exported for the bench, timed in this order (gpu_export.sh's EXPORTS form; default: base, FWL
# and in-place, full, window 2048, window + 4 sinks), STREAM_GRAPHS: the full graphs stream_by_chunk.py streams (default
# base fwl ttt), MEMORY_GRAPHS: full graphs whose static session memory is measured per arena strategy
# (static_memory.py; default none), QUICK_VERIFY: NEW's graphs verified on CUDA after the bench (fp16 on the document),
# FORM_SWITCH: an export-form experiment's environment variable, set per NEW entry by its form field (gpu_export.sh),
# FORM_X: the LLaMA-1B shape's graphs also exported with the switch on (gpu_shapes.sh; default base),
# LINATT=0: skip the LinearAttention check of the profile stage,
# PROFILE: the graphs whose kernels are profiled (default: every SmolLM2 graph; 20-30 s each), PROFILE_1B=0 to
# skip the 1B kernel profile, PROFILE_PAST: the past length at which the full graphs' step is profiled too (B = 1,
# default 7680: the streamed document's last chunk; 0 skips it), PAST_GRAPHS: the full graphs profiled there (default
# base fwl ttt),
# SDPA: attention kernel masks to profile the base window graph (the base graph where NEW has no window graph; and the
# base graph at PROFILE_PAST) with besides
# onnxruntime's choice (e.g. "2 16"),
# VERIFY: calibrated models whose window (plain, and with 4 sinks) and full graphs (fp16 and fp32) are exported and verified on CUDA through
# static sessions (default: "fwl-cal ttt-mix"), STAGES: of "calibrate export bench profile eval verify 1b mfu tests"
# (default: all of them; export, bench, profile, 1b and mfu are the performance side, calibrate and eval the
# calibration side, tests the GPU-only tests).
# Needs the device staging (/tmp/fw-site with onnxruntime-gpu, onnxscript; the SmolLM2 GGUF in /tmp/fw-assets).
set -uo pipefail
R=/tmp/repo; S=/tmp/pipeline; RES=/tmp/out
G=/tmp/fw-assets/SmolLM2-135M-Instruct.Q4_1.gguf; W=/tmp/w; X=$W/x
case ${1:-} in
start)
  rm -rf $R && mkdir -p $R $S $RES && tar -C "$(dirname "$0")/.." --exclude=./.device -cf - . | tar -C $R -xf -
  for v in RUNS STEPS EVALS ABLATE OLD OLD_EXPORTS NEW CONVERT CONVERT2 RUNS2 STAGES VERIFY SDPA PROFILE PROFILE_1B PROFILE_PAST PAST_GRAPHS LINATT STREAM_GRAPHS MEMORY_GRAPHS QUICK_VERIFY FORM_SWITCH FORM_X; do [ -n "${!v:-}" ] && printf '%s=%q\n' "$v" "${!v}"; done > $S/settings
  setsid nohup bash $R/benchmarks/gpu_pipeline.sh run > $S/pipeline.log 2>&1 < /dev/null &
  echo "started (pid $!); follow with: bash benchmarks/gpu_pipeline.sh status"
  exit 0;;
status)
  tail -n "${LINES_SHOWN:-40}" $S/pipeline.log
  # one archive: the device returns a limited number of files per call
  if [ -n "${OUT:-}" ] && [ -d $RES ]; then tar czf "$OUT/results.tgz" -C $RES . 2>/dev/null; fi
  exit 0;;
run) ;;
*) echo "usage: $0 start|status" >&2; exit 2;;
esac
# shellcheck disable=SC1090
set -a; . $S/settings; set +a
cd $R
export PYTHONPATH=/tmp/fw-site:$R PYTHONUNBUFFERED=1 OUT=$RES W
RUNS=${RUNS:-"ttt-mix:ttt:1e-3:fast=1e-4 ttt-base-hi:ttt:1e-3:baseline fwl-cal:fwl:1e-3"}
EVALS=${EVALS:-"ttt-mix:ttt-base-hi ttt-mix-static:ttt-base-hi"}; ABLATE=${ABLATE:-ttt-mix}
OLD_EXPORTS=${OLD_EXPORTS:-"base-w3:$G:fp16:2048 fwl-w3:$W/fwl:fp16:2048 ttt-w3:$W/ttt:fp16:2048"}
OLD_NAMES=$(for e in $OLD_EXPORTS; do printf '%s ' "${e%%:*}"; done)
VERIFY=${VERIFY:-"fwl-cal ttt-mix"}; STAGES=${STAGES:-"calibrate export bench profile eval verify 1b mfu tests"}
DOC=$(python3 -c "import sysconfig, os; print(os.path.join(sysconfig.get_paths()['stdlib'], 'typing.py'))")
on() { [[ " $STAGES " == *" $1 "* ]]; }
stage() { echo "== $(date +%T) stage $*"; }
T0=$SECONDS
stage "prep: documents and conversions"
PREP_ONLY=1 bash benchmarks/gpu_calibrate.sh

stage "calibrate ($RUNS) on the GPU while the graphs export on the CPUs ($STAGES)"
on calibrate && RUNS="$RUNS" STEPS=${STEPS:-600} LIMIT=1500 bash benchmarks/gpu_calibrate.sh > $RES/calibrate.log 2>&1 &
if on export; then
  EXPORTS="${NEW:-base:$G:fp16 fwl:$W/fwl:fp16 ttt:$W/ttt:fp16 base-w:$G:fp16:2048 fwl-w:$W/fwl:fp16:2048 ttt-w:$W/ttt:fp16:2048 base-ws:$G:fp16:2048:4 ttt-ws:$W/ttt:fp16:2048:4}" \
    PART=export bash benchmarks/gpu_export.sh > $RES/export-new.log 2>&1 &
  if [ -n "${OLD:-}" ] && [ -d "$OLD" ]; then
    (cd "$OLD" && PYTHONPATH=/tmp/fw-site:$OLD EXPORTS="$OLD_EXPORTS" \
       PART=export bash benchmarks/gpu_export.sh > $RES/export-old.log 2>&1) &
  fi
  on 1b && W=/tmp/w1b OUT=$RES/shapes-export PARTS=export SMOL=0 BUDGET=900 bash benchmarks/gpu_shapes.sh > /dev/null 2>&1 &
fi
wait
tail -n 8 $RES/calibrate.log 2>/dev/null; grep -h "^export" $RES/export-*.log 2>/dev/null
cat $RES/shapes-export/shapes.md 2>/dev/null; echo "   ($((SECONDS - T0)) s so far)"

if on bench; then
  stage "chunk-step benchmark (SmolLM2), alone on the machine"
  names="base fwl ttt base-w fwl-w ttt-w base-ws ttt-ws"; [ -n "${NEW:-}" ] && names=$(for e in $NEW; do printf '%s ' "${e%%:*}"; done)
  g=(); for n in $names $OLD_NAMES; do [ -d $X/$n ] && g+=(--graph "$n=$X/$n"); done
  (cd benchmarks && timeout 600 python3 chunk_step.py --gguf "$G" "${g[@]}" --doc "$DOC" \
     --out-md $RES/chunk-step.md --out-json $RES/chunk-step.json > $RES/chunk-step.log 2>&1)
  tail -n 40 $RES/chunk-step.md; echo "   ($((SECONDS - T0)) s so far)"
  # the full graphs' streaming, ordinary and static sessions: interleaved passes and each chunk's step (about 1 min)
  g=(); for n in ${STREAM_GRAPHS:-base fwl ttt}; do [ -d $X/$n ] && g+=(--graph "$n=$X/$n"); done
  [ ${#g[@]} -gt 0 ] && (cd benchmarks && timeout 300 python3 stream_by_chunk.py "${g[@]}" --static --passes 3 \
     --out-md $RES/stream-by-chunk.md --out-json $RES/stream-by-chunk.json > $RES/stream-by-chunk.log 2>&1)
  tail -n 16 $RES/stream-by-chunk.md 2>/dev/null; echo "   ($((SECONDS - T0)) s so far)"
  # QUICK_VERIFY: NEW's fp16 graphs verified on CUDA (static sessions, 16 chunks of the document) before the 1B stage
  for n in ${QUICK_VERIFY:-}; do
    [ -d $X/$n ] && timeout 300 python3 -m fwconvert verify $X/$n --provider cuda --static --chunks 16 --text "$DOC" \
      --json > $RES/verify-$n.json 2> $RES/verify-$n.err
    echo "verify $n: rc $? $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('PASS' if r['passed'] else 'FAIL', r['worst'], r['perplexity'])" $RES/verify-$n.json 2>&1 | tail -n 1)"
  done
  # static full sessions' device memory by arena strategy (MEMORY_GRAPHS; about 30 s per graph and strategy)
  g=(); for n in ${MEMORY_GRAPHS:-}; do [ -d $X/$n ] && g+=(--graph "$n=$X/$n"); done
  [ ${#g[@]} -gt 0 ] && (cd benchmarks && timeout 400 python3 static_memory.py "${g[@]}" --out-md $RES/static-memory.md \
     > $RES/static-memory.log 2>&1)
  head -n 8 $RES/static-memory.md 2>/dev/null
fi

stage "calibrated graphs of $VERIFY export (CPUs) while the kernel profiles run (GPU)"
if on verify; then
  e=""; for m in $VERIFY; do e+=" $m-w:$W/$m:fp16:2048 $m-ws:$W/$m:fp16:2048:4 $m-f:$W/$m:fp16 $m-f32:$W/$m:fp32"; done
  EXPORTS="$e" PART=export bash benchmarks/gpu_export.sh > $RES/export-cal.log 2>&1 &
fi
if on profile; then
  g=(); for n in ${PROFILE:-base fwl ttt base-w fwl-w ttt-w $OLD_NAMES}; do [ -d $X/$n ] && g+=("$n=$X/$n"); done
  (cd benchmarks && timeout 400 python3 kernel_profile.py "${g[@]}" --batch 1 8 --md $RES/kernels.md --json $RES/kernels.json \
     > $RES/kernels.log 2>&1)
  n=base-w; [ -d $X/$n ] || n=base
  for k in ${SDPA:-}; do  # the base window graph (else full) with other attention kernels (onnxruntime's sdpa_kernel mask)
    (cd benchmarks && timeout 200 python3 kernel_profile.py "$n=$X/$n" --batch 1 8 --sdpa-kernel "$k" \
       --md $RES/kernels-sdpa$k.md --json $RES/kernels-sdpa$k.json > $RES/kernels-sdpa$k.log 2>&1)
  done
  if [ "${PROFILE_PAST:-7680}" != 0 ]; then  # the streaming document's last chunk: full graphs, KV cache grown
    g=(); for n in ${PAST_GRAPHS:-base fwl ttt}; do [ -d $X/$n ] && g+=("$n=$X/$n"); done
    (cd benchmarks && timeout 300 python3 kernel_profile.py "${g[@]}" --batch 1 --past "${PROFILE_PAST:-7680}" \
       --md $RES/kernels-past.md --json $RES/kernels-past.json > $RES/kernels-past.log 2>&1)
    for k in ${SDPA:-}; do
      (cd benchmarks && timeout 200 python3 kernel_profile.py "base=$X/base" --batch 1 --past "${PROFILE_PAST:-7680}" \
         --sdpa-kernel "$k" --md $RES/kernels-past-sdpa$k.md --json $RES/kernels-past-sdpa$k.json \
         > $RES/kernels-past-sdpa$k.log 2>&1)
    done
  fi
  # onnxruntime's LinearAttention against the FWL graphs' masked form on FWL's shapes (about 1 min; LINATT=0 skips)
  [ "${LINATT:-1}" != 0 ] && (cd benchmarks && timeout 180 python3 linear_attention_check.py --provider cuda --batch 1 8 \
     --md $RES/linear-attention.md --json $RES/linear-attention.jsonl > $RES/linear-attention.log 2>&1)
  tail -n 14 $RES/linear-attention.md 2>/dev/null
fi
wait
grep -h "^export" $RES/export-cal.log 2>/dev/null; echo "   ($((SECONDS - T0)) s so far)"

if on eval; then
  stage "evaluation ($EVALS), alone on the machine"
  EVALS="$EVALS" ABLATE="$ABLATE" bash benchmarks/gpu_eval.sh > $RES/eval.log 2>&1
  tail -n 30 $RES/eval.log; echo "   ($((SECONDS - T0)) s so far)"
fi

if on verify; then
stage "verify on the CUDA provider"
V=$RES/verify; mkdir -p $V
vf() { local tag=$1 name=$2; shift 2; [ -d $X/$name ] || { echo "verify $name: no graph"; return; }
  timeout 300 python3 -m fwconvert verify $X/$name --provider cuda "$@" --json > $V/$tag.json 2> $V/$tag.err
  echo "verify $tag ($name $*): rc $?"; }
for m in $VERIFY; do
  vf $m-w-fp16-text $m-w --static --chunks 16 --text "$DOC"
  vf $m-ws-fp16-text $m-ws --static --chunks 16 --text "$DOC"  # the window with 4 attention sinks
  vf $m-f32-static-b8 $m-f32 --static --batch 8 --chunks 8  # full attention: one pinned session and graph per past
  vf $m-f-fp16-text $m-f --static --chunks 16 --text "$DOC"
done
python3 - $V/*.json <<'PY'
import json, sys
for p in sys.argv[1:]:
    try:
        r = json.load(open(p))
        print(f"{p.rsplit('/', 1)[1]}: {'PASS' if r['passed'] else 'FAIL'} worst {r['worst']} on {r['provider']}")
    except Exception as e:  # noqa: BLE001
        print(p, "unreadable:", e)
PY
echo "   ($((SECONDS - T0)) s so far)"
fi

if on 1b; then
  stage "chunk step of the LLaMA-1B shape"
  W=/tmp/w1b OUT=$RES/shapes-chunk PARTS=chunk SMOL=0 BUDGET=500 bash benchmarks/gpu_shapes.sh > /dev/null 2>&1
  tail -n 30 $RES/shapes-chunk/chunk-step-1b.md 2>/dev/null
  if [ "${PROFILE_1B:-1}" != 0 ]; then
    g=(); for n in base fwl ttt base-x fwl-x ttt-x; do [ -d /tmp/w1b/$n-fp16 ] && g+=("$n=/tmp/w1b/$n-fp16"); done
    (cd benchmarks && timeout 200 python3 kernel_profile.py "${g[@]}" --batch 8 --md $RES/kernels-1b.md \
       --json $RES/kernels-1b.json > $RES/kernels-1b.log 2>&1)
  fi
fi
if on mfu; then
  stage "calibration throughput and MFU of the LLaMA-1B shape, TF32 off and on"
  W=/tmp/w1b OUT=$RES/shapes-calib PARTS=calib SMOL=0 BUDGET=400 bash benchmarks/gpu_shapes.sh > /dev/null 2>&1
  tail -n 6 $RES/shapes-calib/shapes.md 2>/dev/null
fi
if on tests; then
  stage "GPU-only tests"
  timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_runtime_cuda.py tests/test_calibrate_gpu.py \
    > $RES/gpu-tests.log 2>&1
  echo "gpu tests: rc $?"; tail -n 5 $RES/gpu-tests.log
fi
stage "done in $((SECONDS - T0)) s"
