"""Where one chunk step of an exported graph spends its time on onnxruntime CUDA (ORT's own profiler).

    python benchmarks/ort_profile.py EXPORTED [--batch 1] [--chunk 512] [--iters 10] [--json OUT.json]

Runs ``--iters`` chunk steps from an empty past with the state on the device, then reads ORT's profile:
time per op type (summed node time, per step), the slowest nodes, how many nodes ran on each execution
provider (CPU nodes and Memcpy nodes in a CUDA session are flagged: they mean host round trips), and the
sum of node times against the wall time per step (the gap is launch and framework overhead).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def profile(folder: str, batch: int, chunk: int, iters: int, provider: str = "cuda") -> dict:
    import onnxruntime as ort

    from exporters.runtime.session import ChunkSession, _providers, tf32_policy

    base = ChunkSession(folder, provider=provider)
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.log_severity_level = 3
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    base.sess = ort.InferenceSession(base.path, opts, providers=_providers(provider, tf32_policy(base.manifest.dtype)))
    ids = np.random.default_rng(0).integers(0, base.manifest.vocab_size, (batch, chunk), dtype=np.int64)
    for _ in range(3):  # warm-up (kernel selection, allocations)
        state = base.new_state(batch)
        base.step(ids, state, fetch=False)
    state.position()
    t = time.perf_counter()
    for _ in range(iters):
        state = base.new_state(batch)
        base.step(ids, state, fetch=False)
        state.position()  # waits for the device
    wall_ms = (time.perf_counter() - t) * 1e3 / iters
    trace = base.sess.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    steps = len(runs)
    last = runs[-iters:] if steps >= iters else runs
    lo = min(e["ts"] for e in last)
    nodes = [e for e in events if e.get("cat") == "Node" and e["ts"] >= lo and e.get("name", "").endswith("_kernel_time")]
    by_type = collections.Counter()
    by_node = collections.Counter()
    providers = collections.Counter()
    for e in nodes:
        a = e.get("args", {})
        by_type[a.get("op_name", "?")] += e["dur"]
        by_node[e["name"][:-len("_kernel_time")]] += e["dur"]
        providers[a.get("provider", "?")] += 1
    n = max(len(last), 1)
    node_ms = sum(by_type.values()) / 1e3 / n
    run_ms = sum(e["dur"] for e in last) / 1e3 / n
    return {"graph": folder, "batch": batch, "chunk": chunk, "iters": n, "wall_ms_per_step": wall_ms,
            "ort_run_ms_per_step": run_ms, "node_time_ms_per_step": node_ms,
            "nodes_per_step_by_provider": {k: v // n for k, v in providers.items()},
            "memcpy_nodes_per_step": sum(1 for e in nodes if "Memcpy" in e.get("args", {}).get("op_name", "")) // n,
            "ms_per_step_by_op_type": {k: round(v / 1e3 / n, 4) for k, v in by_type.most_common()},
            "slowest_nodes_ms": {k: round(v / 1e3 / n, 4) for k, v in by_node.most_common(12)}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("exported", nargs="+")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = [profile(f, a.batch, a.chunk, a.iters, a.provider) for f in a.exported]
    for r in out:
        top = list(r["ms_per_step_by_op_type"].items())[:10]
        print(f"{r['graph']}: wall {r['wall_ms_per_step']:.2f} ms/step, ORT run {r['ort_run_ms_per_step']:.2f}, "
              f"node time {r['node_time_ms_per_step']:.2f}; nodes by provider {r['nodes_per_step_by_provider']}, "
              f"memcpy nodes {r['memcpy_nodes_per_step']}")
        print("   " + ", ".join(f"{k} {v:.3f}" for k, v in top))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
