"""Streaming one long input through exported graphs, chunk by chunk: where a stream's time goes as the KV cache grows.

    python benchmarks/stream_by_chunk.py --graph base=DIR --graph base-a=DIR [--static] [--passes 3] --out-md F.md

For each graph (interleaved, ``--passes`` rounds, after one untimed warm-up pass each) it times the whole stream
without a wait between chunks (tokens/s, as benchmarks/chunk_step.py's streaming), then the same stream with the
device synchronised after every chunk (ms per chunk at each past length). Random token ids (timing only; the
numerics are verify's). Ordinary sessions by default; ``--static`` adds static sessions (CUDA graphs on CUDA).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from common import markdown_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graph", action="append", required=True, help="NAME=EXPORTED_FOLDER")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--static", action="store_true", help="also static sessions")
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--out-json", default=None)
    a = ap.parse_args(argv)
    if a.chunk < 1 or a.tokens < a.chunk or a.tokens % a.chunk or a.passes < 1:
        ap.error("--tokens must be a positive multiple of --chunk (a static session's chunk is pinned), --passes >= 1")
    from exporters.runtime.session import ChunkSession

    graphs = dict(g.split("=", 1) for g in a.graph)
    modes = [False, True] if a.static else [False]
    sessions = {(n, s): ChunkSession(f, provider=a.provider, static_batch=1 if s else None)
                for n, f in graphs.items() for s in modes}
    vocab = next(iter(sessions.values())).manifest.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, (1, a.tokens))
    starts = list(range(0, a.tokens, a.chunk))

    def stream(sess, sync):
        state, per = sess.new_state(1), []
        t0 = time.perf_counter()
        for s in starts:
            t = time.perf_counter()
            sess.step(ids[:, s:s + a.chunk], state, fetch=False)
            if sync:
                state.position()  # device -> host: waits for this step
                per.append((time.perf_counter() - t) * 1e3)
        state.position()
        return a.tokens / (time.perf_counter() - t0), per

    for sess in sessions.values():
        stream(sess, True)  # warm-up: every past length once (static: captures its graphs)
    rates = {k: [] for k in sessions}
    per = {k: [] for k in sessions}
    for _ in range(a.passes):
        for k, sess in sessions.items():
            rates[k].append(stream(sess, False)[0])
            per[k].append(stream(sess, True)[1])
    label = {k: f"{k[0]} ({'static, CUDA graphs' if k[1] and a.provider == 'cuda' else 'static' if k[1] else 'ordinary'})"
             for k in sessions}
    rows = [{"graph": label[k], "tokens/s (each pass)": " / ".join(f"{r:,.0f}" for r in rates[k]),
             "median": f"{np.median(rates[k]):,.0f}"} for k in sessions]
    cols = [0, 1, len(starts) // 2, len(starts) - 1]
    prow = [{"graph": label[k], **{f"past {starts[i]}": f"{np.median([p[i] for p in per[k]]):.2f}" for i in cols},
             "sum": f"{np.median([sum(p) for p in per[k]]):.1f}"} for k in sessions]
    md = (f"Streaming {a.tokens} random tokens in {a.chunk}-token chunks, batch 1, {a.provider}; "
          f"{a.passes} interleaved passes after a warm-up.\n\n"
          + markdown_table(rows, ["graph", "tokens/s (each pass)", "median"])
          + "\n\nms per chunk with the device synchronised after each (median over passes):\n\n"
          + markdown_table(prow, ["graph"] + [f"past {starts[i]}" for i in cols] + ["sum"]) + "\n")
    with open(a.out_md, "w") as f:
        f.write(md)
    if a.out_json:
        with open(a.out_json, "w") as f:
            json.dump({"tokens_per_s": {label[k]: v for k, v in rates.items()},
                       "ms_per_chunk": {label[k]: v for k, v in per.items()}, "starts": starts}, f, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
