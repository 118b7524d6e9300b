#!/usr/bin/env bash
# A short GPU check of an export-form experiment when device time is scarce (a few minutes after the staging):
# SmolLM2's base graph (fp16) exported without and with the experiment switch, both kernel-profiled at B = 1 and 8
# (benchmarks/kernel_profile.py: wall ms per step with CUDA graphs, GPU busy time by kernel class), the switched
# graph verified on CUDA (static session, 16 chunks of a real document).
#   SWITCH=FWCONVERT_EXPERIMENT_X bash benchmarks/gpu_quick_form.sh start   copies the repo to /tmp/q/repo, starts in
#                                                  the background (setsid)
#   bash benchmarks/gpu_quick_form.sh status       the log so far; /tmp/q/out as $OUT/quick.tgz
# SWITCH: the experiment's environment variable (required; no export-form switch exists now: session 17 adopted the
# last one, wide RoPE heads).
set -uo pipefail
Q=/tmp/q; G=/tmp/fw-assets/SmolLM2-135M-Instruct.Q4_1.gguf
case ${1:-} in
start)
  [ -n "${SWITCH:-}" ] || { echo "SWITCH (the experiment's environment variable) is required" >&2; exit 2; }
  rm -rf $Q/repo && mkdir -p $Q/repo $Q/out && tar -C "$(dirname "$0")/.." --exclude=./.device -cf - . | tar -C $Q/repo -xf -
  echo "SWITCH=$SWITCH" > $Q/settings
  setsid nohup bash $Q/repo/benchmarks/gpu_quick_form.sh run > $Q/out/quick.log 2>&1 < /dev/null &
  echo "started (pid $!)"; exit 0;;
status)
  tail -n "${LINES_SHOWN:-40}" $Q/out/quick.log
  [ -n "${OUT:-}" ] && tar czf "$OUT/quick.tgz" -C $Q/out . 2>/dev/null
  exit 0;;
run) ;;
*) echo "usage: $0 start|status" >&2; exit 2;;
esac
. $Q/settings
cd $Q/repo
export PYTHONPATH=/tmp/fw-site:$Q/repo PYTHONUNBUFFERED=1
DOC=$(python3 -c "import sysconfig, os; print(os.path.join(sysconfig.get_paths()['stdlib'], 'typing.py'))")
echo "== $(date +%T) exports (base: $SWITCH=0, base-x: $SWITCH=1)"
for v in 0 1; do n=base; [ $v = 1 ] && n=base-x
  [ -d $Q/$n ] || env "$SWITCH=$v" OMP_NUM_THREADS=8 timeout 400 python3 -m fwconvert export-onnx "$G" -o $Q/$n \
    --chunk-size 512 --dtype fp16 --force > $Q/out/export-$n.log 2>&1 &
done
wait; tail -n 1 $Q/out/export-*.log
echo "== $(date +%T) kernel profiles"
(cd benchmarks && timeout 300 python3 kernel_profile.py base=$Q/base base-x=$Q/base-x --batch 1 8 --md $Q/out/kernels.md \
   --json $Q/out/kernels.json > $Q/out/kernels.log 2>&1); head -n 8 $Q/out/kernels.md
echo "== $(date +%T) verify base-x on CUDA"
timeout 200 python3 -m fwconvert verify $Q/base-x --provider cuda --static --chunks 16 --text "$DOC" --json \
  > $Q/out/verify-base-x.json 2> $Q/out/verify-base-x.err; echo "rc $?"; tail -n 2 $Q/out/verify-base-x.err
echo "== $(date +%T) DONE"
