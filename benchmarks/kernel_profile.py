"""Which GPU kernels one chunk step of an exported graph runs, and how long each takes (CUDA provider).

    python benchmarks/kernel_profile.py NAME=EXPORTED [NAME=EXPORTED ...] [--batch 1] [--steps 10] [--past 0] [--json OUT]

ORT's own profiler (benchmarks/ort_profile.py) times graph *nodes* from the host: it cannot say which nodes launch
no kernel (a Reshape that only aliases its input) or how long a kernel runs inside a replayed CUDA graph. Here
torch's profiler (CUPTI, process-wide, so it records onnxruntime's kernels too) records every kernel of
``--steps`` chunk steps from an empty state (or, with ``--past P``, each after P tokens of past: the KV cache of a
full-attention export grown to P by unmeasured steps first): window exports through a static session with CUDA graphs and one
without, other exports through an ordinary session with the state on the device. Per graph it reports, per step: the wall time, the number of kernels, the sum of
kernel times (busy), the span from the first kernel's start to the last one's end, and kernel time by class
(GEMM, attention, norm, ...) and by kernel name; memcpy/memset records (the chunk's ids, a new state) are
counted apart. busy ≈ span ≈ wall means the GPU itself is the bound (fewer or
faster kernels help); span << wall means host overhead.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLASSES = [  # (class, pattern on the lower-cased kernel name), first match wins
    ("attention", r"fmha|flash|attention|mha|softmax_warp|attn"),
    ("gemm", r"gemm|cutlass|sm90_|sm80_|xmma|cublas|matmul|ampere_|hopper_|nvjet"),
    ("norm", r"layernorm|layer_norm|rmsnorm|skip"),
    ("softmax/reduce", r"softmax|reduce|cub::"),
    ("transpose/copy", r"transpose|copy|concat|slice|split|gather|expand|scatter|pad|memcpy|tile"),
    ("elementwise", r"elementwise|binary|unary|_add|_mul|_sub|_div|cast|neg|sqrt|pow|exp|where|relu|silu|sigmoid"),
]


def classify(name: str) -> str:
    low = name.lower()
    for cls, pat in CLASSES:
        if re.search(pat, low):
            return cls
    return "other"


def short(name: str, n: int = 90) -> str:
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= n else name[:n - 3] + "..."


def dur(e) -> float:
    """A profiler event's duration in µs."""
    return e.time_range.end - e.time_range.start


def profile_graph(folder: str, batch: int, steps: int, torch, cuda_graph: bool, tf32=None, sdpa=None,
                  past: int = 0) -> dict:
    from exporters.runtime.session import ChunkSession

    sess = ChunkSession(folder, provider="cuda", static_batch=batch if cuda_graph is not None else None,
                        cuda_graph=cuda_graph, use_tf32=tf32, attention_kernels=sdpa)
    ids = np.random.default_rng(0).integers(0, sess.manifest.vocab_size, (batch, sess.chunk_size), dtype=np.int64)

    # a static session of a window export steps on (its state keeps its shape); the others start from an empty past
    # (a static full-attention session resets on the device first: Identity copies, counted as copies, not kernels)
    static_state = sess.new_state(batch) if sess.static is not None and not sess.static.growing else None
    if past % sess.chunk_size:
        raise ValueError(f"--past {past} is not a multiple of the chunk size {sess.chunk_size}")
    prefix = 0 if static_state is not None else past // sess.chunk_size  # a window state is past its window anyway

    def ready():
        """A state whose next step is the one measured: fresh, then ``prefix`` chunk steps (unmeasured)."""
        state = static_state if static_state is not None else sess.new_state(batch)
        for _ in range(prefix):
            sess.step(ids, state, fetch=False)
        state.position()  # device -> host: waits for them
        return state

    def one(state):
        sess.step(ids, state, fetch=False)
        state.position()  # device -> host: waits for the step

    for _ in range(5):
        one(ready())
    wall = 0.0
    for _ in range(steps):
        state = ready()
        t = time.perf_counter()
        one(state)
        wall += (time.perf_counter() - t) * 1e3 / steps
    from torch.profiler import ProfilerActivity, profile

    def kernels_of(events):
        return sorted((e for e in events if not e.name.lower().startswith(("memcpy", "memset"))),
                      key=lambda e: e.time_range.start)

    def span_ms(ks):
        return (ks[-1].time_range.end - ks[0].time_range.start) / 1e3

    # With a prefix, one profile around each measured step (its state made, unrecorded, before it); without, one
    # profile around all of them, each step on a fresh state (a static session's reset: device copies, counted apart).
    device, spans = [], []
    for _ in range(steps if prefix else 1):
        ahead = ready() if prefix else None
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(1 if prefix else steps):
                one(ahead if prefix else ready())
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        device += events
        ks = kernels_of(events)
        if prefix and ks:
            spans.append(span_ms(ks))
        elif ks:  # split the kernel stream into steps at the largest gaps (steps are separated by host waits)
            gaps = sorted(range(1, len(ks)), key=lambda i: ks[i].time_range.start - ks[i - 1].time_range.end,
                          reverse=True)[:steps - 1]
            bounds = [0] + sorted(gaps) + [len(ks)]
            spans += [span_ms(ks[a:b]) for a, b in zip(bounds, bounds[1:])]
    copies = [e for e in device if e.name.lower().startswith(("memcpy", "memset"))]
    kernels = kernels_of(device)
    if not kernels:
        return {"folder": folder, "batch": batch, "wall_ms": wall, "note": "no kernels recorded (CUPTI unavailable?)",
                "cuda_graph": sess.cuda_graph}
    by_class, by_name, count_name = collections.Counter(), collections.Counter(), collections.Counter()
    for e in kernels:
        d = dur(e)
        by_class[classify(e.name)] += d
        by_name[e.name] += d
        count_name[e.name] += 1
    busy = sum(by_class.values()) / 1e3 / steps
    copy_t, copy_n = collections.Counter(), collections.Counter()  # memcpy / memset events by name (direction)
    for e in copies:
        copy_t[e.name] += dur(e)
        copy_n[e.name] += 1
    return {
        "folder": folder, "batch": batch, "past": prefix * sess.chunk_size, "cuda_graph": sess.cuda_graph,
        "provider": sess.provider_note,
        "steps": steps, "wall_ms": round(wall, 3),
        "kernels_per_step": len(kernels) / steps, "busy_ms": round(busy, 3),
        "copies_per_step": len(copies) / steps,
        "copy_ms": round(sum(dur(e) for e in copies) / 1e3 / steps, 3),
        "span_ms": round(float(np.median(spans)), 3),
        "by_class_ms": {k: round(v / 1e3 / steps, 3) for k, v in by_class.most_common()},
        "top_kernels": [{"name": short(k), "class": classify(k), "ms_per_step": round(v / 1e3 / steps, 4),
                         "per_step": count_name[k] / steps, "us_each": round(v / count_name[k], 2)}
                        for k, v in by_name.most_common(25)],
        "copies": [{"name": k, "per_step": copy_n[k] / steps, "ms_per_step": round(v / 1e3 / steps, 4)}
                   for k, v in copy_t.most_common()],
    }


def markdown(results: list) -> str:
    out = ["| graph | B | past | session | wall ms | kernels/step | busy ms | span ms | by class (ms) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results:
        if "busy_ms" not in r:
            out.append(f"| {name} | {r['batch']} | {r.get('past', '-')} | {r['cuda_graph']} | {r['wall_ms']:.2f} | - | - | - "
                       f"| {r['note']} |")
            continue
        cls = ", ".join(f"{k} {v:.2f}" for k, v in r["by_class_ms"].items())
        out.append(f"| {name} | {r['batch']} | {r.get('past', 0)} | {r['provider']} | {r['wall_ms']:.2f} | {r['kernels_per_step']:.0f} "
                   f"| {r['busy_ms']:.2f} | {r['span_ms']:.2f} | {cls} |")
    for name, r in results:
        if "top_kernels" not in r:
            continue
        out += ["", f"Top kernels of {name}, B = {r['batch']}, past {r.get('past', 0)}, {r['provider']}:", "",
                "| kernel | class | per step | µs each | ms per step |", "|---|---|---|---|---|"]
        out += [f"| `{k['name']}` | {k['class']} | {k['per_step']:g} | {k['us_each']} | {k['ms_per_step']:.3f} |"
                for k in r["top_kernels"]]
        if r.get("copies"):
            fresh = "" if r.get("past") else (" (with each step's fresh state, made between the profiled steps: a "
                                                 "static session's reset on the device, an ordinary session's upload)")
            out += ["", f"Copies per step{fresh}: " + "; ".join(f"`{c['name']}` {c['per_step']:g} × ({c['ms_per_step']:.3f} ms)"
                                                             for c in r["copies"])]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="+", help="NAME=EXPORTED_FOLDER")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tf32", choices=["auto", "on", "off"], default="auto",
                    help="TF32 for fp32 matmuls (auto: the sessions' policy, on for fp16 graphs)")
    ap.add_argument("--sdpa-kernel", type=int, default=None,
                    help="onnxruntime's sdpa_kernel mask for the fused attention (flash 1, memory-efficient 2, "
                         "cuDNN flash 8, unfused 16; default: onnxruntime's own choice)")
    ap.add_argument("--past", type=int, default=0,
                    help="profile the step after this many tokens of past (a multiple of the chunk; full-attention "
                         "graphs: the KV cache grown to it; a window graph's static state is past its window anyway)")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--md", default=None, help="write the Markdown table here too")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("kernel_profile.py: needs a CUDA GPU (onnxruntime's CUDA provider and CUPTI)")
    torch.cuda.init()
    results = []
    from exporters.runtime.session import load_manifest

    for g in a.graphs:
        name, _, folder = g.partition("=")
        try:  # a static session with CUDA graphs, and one without (window: static; full: the ordinary session)
            modes = [True, False] if load_manifest(folder).attention == "window" else [True, None]
        except Exception as e:  # noqa: BLE001 - not an export: say so and go on
            print(f"{name}: skipped, {folder} is not a readable export ({e})", file=sys.stderr)
            continue
        for b in a.batch:
            for mode in modes:
                try:
                    r = profile_graph(folder, b, a.steps, torch, mode, {"auto": None, "on": True, "off": False}[a.tf32],
                                      a.sdpa_kernel, a.past)
                except Exception as e:  # noqa: BLE001 - report and go on with the next graph
                    r = {"folder": folder, "batch": b, "wall_ms": float("nan"), "cuda_graph": mode,
                         "note": f"failed: {e}"}
                results.append((name, r))
                print(f"{name} B={b}: {json.dumps({k: v for k, v in r.items() if k != 'top_kernels'})}",
                      file=sys.stderr)
    md = markdown(results)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"name": n, **r} for n, r in results], f, indent=1)


if __name__ == "__main__":
    main()
