#!/usr/bin/env bash
# On the GPU machine (after .device staging): convert SmolLM2-135M both ways, then calibrate the fast-weight
# models and their identically calibrated baselines at sequence 8192, all runs at once on the one GPU.
# Models go to /tmp/w/<run>, logs to /tmp/w/logs, and one archive of manifests + logs to $OUT/calib.tgz.
#   STEPS=600 bash benchmarks/gpu_calibrate.sh        (again with the same settings: finished runs are kept,
#                                                      interrupted ones continue with --resume)
# CONVERT (optional): more conversions of the GGUF, "name=command args;...", e.g.
#   CONVERT="ttt3=mark-fast --chunk-size 512 --layers every:3;ttt-eta10=mark-fast --chunk-size 512 --lr 10"
# RUNS: "name:model:lr[:options]" entries; model is fwl, ttt or a CONVERT name; options, comma-separated:
# "baseline" calibrates the plain base model with the same recipe (--baseline); "fast=LR" gives the new fast-weight
# parameters their own peak lr (--fast-lr); "train=SET" replaces --train $TRAIN; "steps=N" replaces $STEPS;
# "batch=N" sets --batch-size (windows per update per process); "gpus=N" runs it on N GPUs through torchrun (DDP).
# The two-GPU check of issue #6 (on a machine with 2 GPUs; the same global batch of 2 either way):
#   RUNS="one-gpu:ttt:1e-3:batch=2 two-gpu:ttt:1e-3:gpus=2" STEPS=300 bash benchmarks/gpu_calibrate.sh
#   python3 benchmarks/compare_losses.py /tmp/w/one-gpu /tmp/w/two-gpu
# E.g. "ttt-mix:ttt:1e-3:fast=1e-4 ttt-base-hi:ttt:1e-3:baseline". Every run uses the same data, seed and schedule,
# so a model and its baseline differ only by the fast weights (and what the options name).
# A second phase (optional) starts from calibrated runs: CONVERT2 = "name=command args @run;..." converts the
# calibrated folder of a finished run (e.g. "ttt-on-base=mark-fast --chunk-size 512 @ttt-base-hi": fast weights
# added to the tuned baseline), then RUNS2 (same syntax as RUNS) calibrates, e.g. "ttt2:ttt-on-base:1e-4:train=fast"
# (only the new parameters: the baseline's W_down stay as they are, so its η = 0 ablation is the baseline itself).
# Data: the stdlib's .py files >= 8 KB (DOCS, its long held-out files are the evaluation set of gpu_eval.sh)
# plus MORE_MB of the host's long library .py files (dist-packages, >= 16 KB; training data unless held out).
set -uo pipefail
export PYTHONPATH=/tmp/fw-site:$PWD PYTHONUNBUFFERED=1
G=${G:-/tmp/fw-assets/SmolLM2-135M-Instruct.Q4_1.gguf}; W=${W:-/tmp/w}; STEPS=${STEPS:-600}; OUT=${OUT:-/tmp/out}
LIMIT=${LIMIT:-520}; TRAIN=${TRAIN:-fast+baseline}; MORE_MB=${MORE_MB:-24}; SEQ=${SEQ:-8192}; DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-"fwl-cal:fwl:1e-3 fwl-base:fwl:1e-3:baseline ttt-cal:ttt:1e-4 ttt-base:ttt:1e-4:baseline ttt-base-hi:ttt:1e-3:baseline fwl-hi:fwl:3e-3 fwl-base-hi:fwl:3e-3:baseline"}
mkdir -p "$W/logs" "$OUT"
[ -d "$W/docs" ] || python3 benchmarks/copy_docs.py "$W/docs" --min-bytes 8000 --more "$W/more" --more-mb "$MORE_MB"
t() { local s=$SECONDS; echo "+ $*" >&2; "$@"; local rc=$?; echo "  (rc $rc, $((SECONDS - s)) s)" >&2; return $rc; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
[ -d $W/fwl ] || t python3 -m fwconvert add-fwl "$G" -o $W/fwl --chunk-size 512 &
[ -d $W/ttt ] || t python3 -m fwconvert mark-fast "$G" -o $W/ttt --chunk-size 512 &
IFS=';' read -r -a convs <<< "${CONVERT:-}"  # more conversions: "name=command args;..." (RUNS name them as models)
for c in "${convs[@]}"; do
  [ -n "$c" ] || continue
  name=${c%%=*}; read -r -a cmd <<< "${c#*=}"
  [ -d "$W/$name" ] || t python3 -m fwconvert "${cmd[@]}" "$G" -o "$W/$name" &
done
wait
[ "${PREP_ONLY:-0}" = 1 ] && exit 0  # data and converted models only
CAL=(--data $W/docs --data $W/more --ext .py --seq-len "$SEQ" --device "$DEVICE" --heldout 0.15
     --no-progress --seed 0 --save-every 100)
calibrate_runs() {  # RUNS entries, all at once on the GPU
  for r in "$@"; do
    IFS=: read -r name model lr opts <<< "$r"
    [ -f "$W/$name/MANIFEST.json" ] && { echo "$name: done already"; continue; }
    extra=(--resume)  # continues from the run's newest checkpoint, or starts at step 0 when there is none
    train=$TRAIN; steps=$STEPS; batch=1; launch=(python3)
    IFS=, read -r -a kinds <<< "${opts:-}"
    for k in "${kinds[@]}"; do
      case $k in baseline) extra+=(--baseline);; fast=*) extra+=(--fast-lr "${k#fast=}");; train=*) train=${k#train=};;
        steps=*) steps=${k#steps=};; batch=*) batch=${k#batch=};;
        gpus=*) launch=(torchrun --standalone --nproc_per_node "${k#gpus=}");; "") ;;
        *) echo "$name: unknown option $k" >&2; continue 2;; esac
    done
    echo "+ $name: calibrate $model lr $lr train $train steps $steps batch $batch ${extra[*]} (${launch[*]})"
    OMP_NUM_THREADS=2 timeout "$LIMIT" "${launch[@]}" -m fwconvert calibrate "$W/$model" -o "$W/$name" "${CAL[@]}" \
      --batch-size "$batch" --lr "$lr" --train "$train" --steps "$steps" "${extra[@]}" > "$W/logs/$name.log" 2>&1 &
  done
  wait
}
calibrate_runs $RUNS
IFS=';' read -r -a convs2 <<< "${CONVERT2:-}"  # the second phase: conversions of calibrated runs, then RUNS2
for c in "${convs2[@]}"; do
  [ -n "$c" ] || continue
  name=${c%%=*}; spec=${c#*=}; src=${spec##*@}; read -r -a cmd <<< "${spec%@*}"
  [ -f "$W/$src/MANIFEST.json" ] || { echo "$name: run $src did not finish, not converted" >&2; continue; }
  [ -d "$W/$name" ] || t python3 -m fwconvert "${cmd[@]}" "$W/$src" -o "$W/$name" &
done
wait
calibrate_runs ${RUNS2:-}
RUNS="$RUNS ${RUNS2:-}"
for r in $RUNS; do n=${r%%:*}; echo "== $n"; tail -n 3 "$W/logs/$n.log"; done
python3 - "$W" $RUNS <<'PY'
import json, os, sys
from safetensors import safe_open
w = sys.argv[1]
for r in sys.argv[2:]:
    name = r.split(":")[0]
    m = os.path.join(w, name, "MANIFEST.json")
    if not os.path.isfile(m):
        print(f"{name}: not finished"); continue
    c = json.load(open(m))["calibration"]
    ls = c["losses"]
    eta = ""
    st = os.path.join(w, name, "model.safetensors")
    if os.path.isfile(st):
        with safe_open(st, "pt") as f:
            if "fwl_head.step_sizes" in f.keys():
                eta = " step sizes " + ", ".join(f"{v:.4g}" for v in f.get_tensor("fwl_head.step_sizes").tolist())
    print(f"{name}: {len(ls)} steps, loss {ls[0]:.3f} -> mean of last 50 {sum(ls[-50:]) / len(ls[-50:]):.3f}, "
          f"{c.get('tokens_per_second', 0):,.0f} tokens/s{eta}")
PY
tar czf "$OUT/calib.tgz" -C $W logs $(cd $W && ls -d */MANIFEST.json 2>/dev/null)
