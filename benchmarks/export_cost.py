"""Wall time and peak memory of one command, run as a child process.

    python benchmarks/export_cost.py --label base-1b --json-out costs.jsonl -- \
        python -m fwconvert export-onnx SRC -o OUT --chunk-size 512 --dtype fp16 --force

Prints one JSON line {label, cmd, seconds, peak_rss_mb, rc} (and appends it to --json-out). The peak is the
child's ``ru_maxrss`` from ``os.wait4`` (KiB on Linux): the high-water mark of its resident memory, file pages
it mapped included. Linux folds in the peak of the child's own waited-for children, so a wrapper such as
``timeout`` in front of the command still reports the largest process, not the sum of all of them (fwconvert
exports in-process, so this is the exporter's own peak). The child's stdout goes to our stderr (or --log).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def measure(cmd, timeout: float | None = None, log: str | None = None, env: dict | None = None) -> dict:
    """Run ``cmd`` (a list) to completion; {seconds, peak_rss_mb, rc}. On ``timeout`` the child's process group
    is sent SIGTERM (SIGKILL 10 s later) and rc is 124, as with coreutils' timeout."""
    out = open(log, "ab") if log else sys.stderr
    t0 = time.perf_counter()
    try:
        p = subprocess.Popen(cmd, stdout=out, stderr=out if log else None, env=env, start_new_session=True)
    finally:
        if log:
            out.close()
    deadline, timed_out = (t0 + timeout if timeout else None), False
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        now = time.perf_counter()
        if deadline is not None and now > deadline:
            try:
                os.killpg(p.pid, signal.SIGKILL if timed_out else signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline, timed_out = (None if timed_out else now + 10), True
        time.sleep(0.005 if now - t0 < 1 else 0.05)
    seconds = time.perf_counter() - t0
    p.returncode = rc = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
            "rc": 124 if timed_out else rc}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: export_cost.py [--label L] [--json-out FILE] [--timeout S] [--log FILE] -- CMD ...",
              file=sys.stderr)
        return 2
    i = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="")
    ap.add_argument("--json-out", help="append the JSON line to this file")
    ap.add_argument("--timeout", type=float, help="seconds before the child is terminated (rc 124)")
    ap.add_argument("--log", help="append the child's stdout and stderr to this file")
    a = ap.parse_args(argv[:i])
    cmd = argv[i + 1:]
    if not cmd:
        ap.error("no command after --")
    rec = {"label": a.label, "cmd": " ".join(cmd), **measure(cmd, a.timeout, a.log)}
    rec["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    line = json.dumps(rec)
    print(line, flush=True)
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(line + "\n")
    return 0 if rec["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
