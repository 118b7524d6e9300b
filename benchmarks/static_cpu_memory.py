"""Peak host memory and streaming time of a static session on the CPU provider (one pinned session per past length
of a full-attention export), with onnxruntime's weight prepacking as configured (exporters/runtime/session.py turns
it off for static CPU sessions since session 17) or forced back on.

    python benchmarks/static_cpu_memory.py EXPORT [--tokens 1792] [--prepack] [--shared-arena]

Streams --tokens random tokens three times through one static session (batch 1): the first pass opens the pinned
sessions, the later ones reuse them. Prints the peak RSS and each pass's seconds. Session 17, SmolLM2 fp32 export
(C = 256, 7 pinned sessions) on this repo's 2-core CPU: prepacking on 5.11 GiB, passes 15.7 / 3.4 / 3.4 s; off
2.96 GiB, 9.3 / 3.6 / 3.6 s.

``--shared-arena`` registers one CPU arena allocator with onnxruntime's environment and opens every session with
``session.use_env_allocators`` (the pinned sessions run one at a time, so their scratch could be the same memory;
the candidate for CUDA static sessions in docs/benchmarks.md). Session 18, the same machine, SmolLM2 fp32 export
with separate q/k/v projections (C = 256, 1,792 tokens, prepacking off), two runs each, alternating: an arena per
session 2.45 / 2.85 GiB peak, one shared arena 2.82 / 2.75 GiB, passes within 0.4 s of each other: no difference
beyond the run-to-run spread, so the pinned sessions' own arenas are not where a static CPU session's memory goes.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export")
    ap.add_argument("--tokens", type=int, default=1792)
    ap.add_argument("--prepack", action="store_true", help="turn onnxruntime's prepacking back on (the old behaviour)")
    ap.add_argument("--shared-arena", action="store_true",
                    help="one CPU arena for every session (onnxruntime's environment allocator)")
    a = ap.parse_args(argv)
    import onnxruntime as ort

    if a.shared_arena:
        cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, -1, -1, -1))
        plain = ort.SessionOptions

        class SharedArena(plain):
            def __init__(self):
                super().__init__()
                self.add_session_config_entry("session.use_env_allocators", "1")

        ort.SessionOptions = SharedArena

    from exporters.runtime.session import ChunkSession, load_manifest

    if a.prepack:  # every SessionOptions the session opens gets prepacking re-enabled
        base = ort.SessionOptions

        class Prepacking(base):
            def add_session_config_entry(self, key, value):
                if key != "session.disable_prepacking":
                    super().add_session_config_entry(key, value)

        ort.SessionOptions = Prepacking
    c = int(load_manifest(a.export).chunking["chunk_size"])
    n = max(a.tokens // c, 1) * c
    s = ChunkSession(a.export, provider="cpu", static_batch=1, static_context=n)
    ids = np.random.default_rng(0).integers(0, s.manifest.vocab_size, (1, n))
    passes = []
    for _ in range(3):
        state, t = s.new_state(1), time.perf_counter()
        for start in range(0, n, c):
            s.step(ids[:, start:start + c], state)
        passes.append(round(time.perf_counter() - t, 2))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"prepacking {'on' if a.prepack else 'off'}, {'one shared arena' if a.shared_arena else 'an arena per session'}"
          f": peak RSS {peak:.2f} GB, passes (s) {passes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
