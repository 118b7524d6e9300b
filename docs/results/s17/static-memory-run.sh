# session 17: static memory by arena strategy for base and in-place (the adopted wide form), after the staging
set -u; R=/tmp/r; rm -rf $R /tmp/o /tmp/x && mkdir -p $R /tmp/o /tmp/x && cp -r "$1"/. $R && rm -rf $R/.device
export PYTHONPATH=/tmp/fw-site:$R PYTHONUNBUFFERED=1; G=/tmp/fw-assets/SmolLM2-135M-Instruct.Q4_1.gguf; cd $R
echo "== $(date +%T) exports"
(python3 -m fwconvert mark-fast $G -o /tmp/w/ttt --chunk-size 512 > /tmp/o/ttt.log 2>&1 && OMP_NUM_THREADS=8 python3 -m fwconvert export-onnx /tmp/w/ttt -o /tmp/x/ttt --chunk-size 512 --dtype fp16 >> /tmp/o/ttt.log 2>&1) &
OMP_NUM_THREADS=8 python3 -m fwconvert export-onnx $G -o /tmp/x/base --chunk-size 512 --dtype fp16 > /tmp/o/base.log 2>&1
echo "== $(date +%T) base memory"; (cd benchmarks && python3 static_memory.py --graph base=/tmp/x/base --out-md /tmp/o/mem-base.md > /tmp/o/mem-base.log 2>&1); head -n 4 /tmp/o/mem-base.md
wait; echo "== $(date +%T) ttt memory"; tail -n 1 /tmp/o/ttt.log
(cd benchmarks && python3 static_memory.py --graph ttt=/tmp/x/ttt --out-md /tmp/o/mem-ttt.md > /tmp/o/mem-ttt.log 2>&1); head -n 4 /tmp/o/mem-ttt.md
echo "== $(date +%T) DONE"
