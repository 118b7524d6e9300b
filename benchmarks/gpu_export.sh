#!/usr/bin/env bash
# On the GPU machine, after gpu_calibrate.sh: export the base model and the calibrated FWL / in-place models
# (fp16, C = 512; full attention, and window 2048 for static sessions with CUDA graphs), verify them on the CUDA
# provider, then the chunk-step benchmark (benchmarks/chunk_step.py) with every graph side by side.
#   PART=export|verify|bench|all   EXPORTS='name:source:dtype[:window[:sinks[:form]]] ...'   (results under $OUT; a
#   window without sinks is the plain window model, --sink-tokens 0; form: a value for the experiment switch named
#   by FORM_SWITCH, an environment variable such as FWCONVERT_EXPERIMENT_X (no export-form switch exists now), set to 1 for the
#   exports whose form field is "x" and to 0 for the others, e.g. FORM_SWITCH=FWCONVERT_EXPERIMENT_X and base-x:$G:fp16:::x)
set -uo pipefail
export PYTHONPATH=/tmp/fw-site:$PWD PYTHONUNBUFFERED=1
G=${G:-/tmp/fw-assets/SmolLM2-135M-Instruct.Q4_1.gguf}; W=${W:-/tmp/w}; OUT=${OUT:-/tmp/out}; PART=${PART:-all}
X=$W/x; WIN=${WIN:-2048}
EXPORTS=${EXPORTS:-"base:$G:fp16 fwl:$W/fwl-cal:fp16 ttt:$W/ttt-cal:fp16 base-w:$G:fp16:$WIN fwl-w:$W/fwl-cal:fp16:$WIN ttt-w:$W/ttt-cal:fp16:$WIN ttt-w32:$W/ttt-cal:fp32:$WIN"}
t() { local s=$SECONDS; echo "+ $*" >&2; "$@"; local rc=$?; echo "  (rc $rc, $((SECONDS - s)) s)" >&2; return $rc; }
DOC=$(python3 -c "import sysconfig, os; print(os.path.join(sysconfig.get_paths()['stdlib'], 'typing.py'))")
mkdir -p "$X" "$OUT"
if [ "$PART" = all ] || [ "$PART" = export ]; then  # on the CPUs, in parallel
  for e in $EXPORTS; do
    IFS=: read -r name src dtype win sinks form <<< "$e"
    args=(--chunk-size 512 --dtype "$dtype" --force); [ -n "${win:-}" ] && args+=(--attention window --window "$win")
    [ -n "${win:-}" ] && args+=(--sink-tokens "${sinks:-0}")  # no sinks given: the plain window model
    sw=(); [ -n "${FORM_SWITCH:-}" ] && sw=("$FORM_SWITCH=$([ "${form:-}" = x ] && echo 1 || echo 0)")
    [ -d "$X/$name" ] || env "${sw[@]}" \
      OMP_NUM_THREADS=2 timeout 540 python3 -m fwconvert export-onnx "$src" -o "$X/$name" "${args[@]}" \
      > "$X/export-$name.log" 2>&1 &
  done
  wait
  for e in $EXPORTS; do n=${e%%:*}; echo "export $n: $(tail -n 1 $X/export-$n.log 2>/dev/null)"; done
fi
if [ "$PART" = all ] || [ "$PART" = verify ]; then
  V=$W/verify; mkdir -p $V
  # the CUDA-graph path against torch fp32 on random tokens at fp32 tolerance (1e-4): replays must be exact
  [ -d $X/ttt-w32 ] && t python3 -m fwconvert verify $X/ttt-w32 --provider cuda --static --chunks 16 --json > $V/ttt-w32-static.json
  [ -d $X/ttt-w32 ] && t python3 -m fwconvert verify $X/ttt-w32 --provider cuda --static --batch 8 --chunks 8 --json > $V/ttt-w32-static-b8.json
  for n in fwl-w ttt-w fwl ttt; do  # fp16 on a real document (random tokens overflow fp16: docs/results.md)
    s=(); case $n in *-w) s=(--static);; esac
    [ -d $X/$n ] && t python3 -m fwconvert verify $X/$n --provider cuda "${s[@]}" --chunks 16 --text "$DOC" --json > $V/$n-fp16-text.json
  done
  python3 - $V/*.json <<'PY'
import json, sys
for p in sys.argv[1:]:
    try:
        r = json.load(open(p))
    except Exception as e:  # noqa: BLE001
        print(p, "unreadable:", e); continue
    print(f"{p.rsplit('/', 1)[1]}: {'PASS' if r['passed'] else 'FAIL'} worst {r['worst']} on {r['provider']}")
PY
  tar czf "$OUT/verify.tgz" -C $W verify
fi
if [ "$PART" = all ] || [ "$PART" = bench ]; then
  graphs=(); for e in $EXPORTS; do n=${e%%:*}; case $n in *32) continue;; esac; [ -d $X/$n ] && graphs+=(--graph "$n=$X/$n"); done
  (cd benchmarks && t timeout 500 python3 chunk_step.py --gguf "$G" "${graphs[@]}" --doc "$DOC" \
     --out-md "$OUT/chunk-step.md" --out-json "$OUT/chunk-step.json")
fi
