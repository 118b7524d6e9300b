"""Device memory of a static full-attention session, by onnxruntime arena strategy: where FWL's extra GB go.

    python benchmarks/static_memory.py --graph base=DIR --graph fwl=DIR [--tokens 8192] --out-md F.md

A static full session keeps one pinned session per past length (16 for 8,192 tokens at C = 512), each with its
own CUDA arena. For each graph and each strategy (onnxruntime's default ``kNextPowerOfTwo``, and
``kSameAsRequested``, which static sessions use since session 17: ``exporters/runtime/session.py::STATIC_ARENA``,
which the child process sets) a fresh process opens the static session (batch 1), streams ``--tokens`` random
tokens twice (the first pass captures the CUDA graphs) and reports the device memory the session took (free memory
before and after, GB: context, workspaces and CUDA graphs included), the second pass's tokens/s, and whether the
two passes' last logits agree (the arena strategy must not change values).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import markdown_table

STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")


def child(folder: str, tokens: int, strategy: str) -> dict:
    import time

    import numpy as np
    import torch

    import exporters.runtime.session as session_module

    from exporters.runtime.session import ChunkSession

    session_module.STATIC_ARENA = strategy
    free0 = torch.cuda.mem_get_info()[0]
    sess = ChunkSession(folder, provider="cuda", static_batch=1, static_context=tokens)
    c = sess.chunk_size
    ids = np.random.default_rng(0).integers(0, sess.manifest.vocab_size, (1, tokens))
    out = {}
    for p in ("capture", "timed"):
        state, t = sess.new_state(1), time.perf_counter()
        for a in range(0, tokens, c):
            last = sess.step(ids[:, a:a + c], state, fetch=a + c >= tokens)
        out[p] = (tokens / (time.perf_counter() - t), np.asarray(last, dtype=np.float64))
    return {"device_gb": round((free0 - torch.cuda.mem_get_info()[0]) / 2 ** 30, 2),
            "tokens_per_s": round(out["timed"][0]), "pinned_sessions": len(sess.static.sessions),
            "passes_agree": bool(np.array_equal(out["capture"][1], out["timed"][1]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graph", action="append", required=True, help="NAME=EXPORTED_FOLDER (full attention)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default=STRATEGIES[0], choices=STRATEGIES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.tokens, a.strategy)))
        return 0
    if any("=" not in g for g in a.graph):
        ap.error("--graph takes NAME=EXPORTED_FOLDER")
    rows, results = [], {}
    for spec in a.graph:
        name, folder = spec.split("=", 1)
        for strategy in STRATEGIES:
            p = subprocess.run([sys.executable, __file__, "--graph", spec, "--out-md", os.devnull, "--tokens",
                                str(a.tokens), "--child", folder, "--strategy", strategy], capture_output=True,
                               text=True, timeout=600)
            try:
                r = json.loads(p.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                r = {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:160]}
            results[f"{name} {strategy}"] = r
            rows.append({"graph": name, "arena strategy": strategy, "device GB": r.get("device_gb", "-"),
                         "tokens/s": r.get("tokens_per_s", "-"), "pinned sessions": r.get("pinned_sessions", "-"),
                         "passes agree / error": r.get("passes_agree", r.get("error", "-"))})
            print(rows[-1], flush=True)
    with open(a.out_md, "w") as f:
        f.write(markdown_table(rows, list(rows[0])) + "\n")
        f.write("\n```json\n" + json.dumps(results, indent=1) + "\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
