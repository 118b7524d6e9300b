"""How often does a finished two-process gloo + DDP job abort at interpreter exit? (session 16's CI failure)

    python benchmarks/ddp_exit_probe.py --runs 50 --mode destroy    # destroy_process_group only
    python benchmarks/ddp_exit_probe.py --runs 90 --mode collect    # drop the wrapper, gc.collect(), then destroy

Each run starts two worker processes (RANK 0/1, gloo on the CPU, no torchrun) that wrap a linear layer in
DistributedDataParallel, take three optimizer steps, all-reduce, barrier, and then tear down as ``--mode`` says
(``collect`` is what ``fwconvert/calibrate/ddp.py::teardown`` does after ``Calibrator.unwrap``). A worker that
dies by a signal (SIGABRT: "terminate called without an active exception") counts as an abort. Measured on a
2-core machine (docs/results.md, session 16): destroy 6 of 40 runs aborted, collect 0 of 60. The rate depends on
timing: without the last loss kept alive, destroy aborted in 1 of 50.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

WORKER = r"""
import gc, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
m = torch.nn.Linear(8, 8)
w = torch.nn.parallel.DistributedDataParallel(m)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
for _ in range(3):
    loss = w(torch.randn(4, 8)).pow(2).mean()  # kept, as a training loop's last loss is
    loss.backward(); opt.step(); opt.zero_grad()
t = torch.ones(1); dist.all_reduce(t)
dist.barrier()
if sys.argv[1] == "collect":
    del w
    gc.collect()
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(mode: str) -> list:
    """The two workers' exit codes."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, mode], env=env, stderr=subprocess.DEVNULL))
    return [p.wait() for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--mode", choices=("destroy", "collect"), default="collect")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs must be at least 1")
    aborted = 0
    for i in range(a.runs):
        codes = one_run(a.mode)
        if any(c < 0 for c in codes):
            aborted += 1
            print(f"run {i}: exit codes {codes}", flush=True)
        elif any(codes):
            sys.exit(f"run {i}: a worker failed without a signal (exit codes {codes})")
    print(f"mode {a.mode}: {aborted} of {a.runs} runs aborted at exit")


if __name__ == "__main__":
    main()
