#!/usr/bin/env bash
# On the GPU machine, after gpu_calibrate.sh: perplexity by position at context 8192 on the held-out stdlib files,
# for base, dynamic evaluation, each calibrated fast-weight model against its identically calibrated baseline,
# and each fast-weight model with its updates switched off (benchmarks/ablate_fast.py: what the fast weights
# themselves buy). One evaluation at a time (tokens/s are compared). Results: $OUT/eval.tgz, table on stdout.
#   bash benchmarks/gpu_eval.sh      (EVALS: "model[:baseline]" entries; ABLATE: models to copy with step sizes 0;
#                                     DOCS: at most this many documents)
set -uo pipefail
export PYTHONPATH=/tmp/fw-site:$PWD PYTHONUNBUFFERED=1
G=${G:-/tmp/fw-assets/SmolLM2-135M-Instruct.Q4_1.gguf}; W=${W:-/tmp/w}; OUT=${OUT:-/tmp/out}; DOCS=${DOCS:-24}
DEVICE=${DEVICE:-cuda}; CONTEXT=${CONTEXT:-8192}
EVALS=${EVALS:-"fwl-cal:fwl-base ttt-cal:ttt-base fwl-hi:fwl-base-hi ttt-base-hi fwl-cal-static:fwl-base ttt-cal-static:ttt-base"}
t() { local s=$SECONDS; echo "+ $*" >&2; "$@"; local rc=$?; echo "  (rc $rc, $((SECONDS - s)) s)" >&2; return $rc; }
mkdir -p "$W/eval" "$OUT"
for m in ${ABLATE:-fwl-cal ttt-cal}; do  # the same models with every fast-weight step size 0 (<name>-static)
  [ -f "$W/$m/MANIFEST.json" ] && [ ! -d "$W/$m-static" ] && python3 benchmarks/ablate_fast.py "$W/$m" "$W/$m-static"
done
EV=(--data $W/docs --ext .py --context "$CONTEXT" --chunk-size 512 --device "$DEVICE" --max-docs "$DOCS" --json)
first=1
for e in $EVALS; do
  IFS=: read -r model baseline <<< "$e"
  [ -f "$W/$model/MANIFEST.json" ] || { echo "$model: not calibrated, skipped"; continue; }
  args=("${EV[@]}"); [ -n "${baseline:-}" ] && [ -d "$W/$baseline" ] && args+=(--baseline "$W/$baseline")
  [ "$first" = 1 ] && args+=(--base "$G" --dynamic-eval --dynamic-eval-params down_proj)  # once: same for all
  case $model in fwl-cal|ttt-cal) args+=(--plot "$W/eval/$model-loss-by-position.png");; esac
  t python3 -m fwconvert eval "$W/$model" "${args[@]}" > "$W/eval/$model.json" && first=0
done
files=(); for e in $EVALS; do f="$W/eval/${e%%:*}.json"; [ -s "$f" ] && files+=("$f"); done
python3 benchmarks/eval_table.py "${files[@]}" | tee "$W/eval/table.md"
tar czf "$OUT/eval.tgz" -C "$W" eval
