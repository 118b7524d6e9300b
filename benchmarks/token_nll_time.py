"""Host time of the runtime's per-token loss (exporters/runtime/stream.py::token_nll) on one chunk of logits, against
the all-float64 form it replaced in session 17, and how far the two are apart.

    python benchmarks/token_nll_time.py [--rows 512] [--vocab 49152]

`fwconvert run` and verify's perplexity compute this on the host for every chunk they stream (the logits fetched
from the session), so on a GPU it can cost more than the chunk step itself. Session 17, this repo's 2-core CPU:
fp16 logits 211 -> 94 ms per 512 x 49,152 chunk, fp32 64 -> 43 ms, the two forms within 3e-8 nats.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from exporters.runtime.stream import token_nll


def float64_form(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The form before session 17: every exponential in float64."""
    m = logits.max(-1, keepdims=True)
    z = np.empty(logits.shape, dtype=np.float64)
    np.subtract(logits, m, out=z, dtype=np.float64)
    np.exp(z, out=z)
    picked = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    return m[..., 0].astype(np.float64) + np.log(z.sum(-1)) - picked.astype(np.float64)


def best_ms(fn, *args, repeats: int = 5) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print("| logits | float64 form ms | token_nll ms | max abs difference (nats) |")
    print("|---|---|---|---|")
    for dtype in (np.float16, np.float32):
        logits = (rng.standard_normal((a.rows, a.vocab)) * 4).astype(dtype)
        targets = rng.integers(0, a.vocab, a.rows)
        diff = float(np.abs(token_nll(logits, targets) - float64_form(logits, targets)).max())
        print(f"| {np.dtype(dtype).name} | {best_ms(float64_form, logits, targets, repeats=a.repeats):.1f} | "
              f"{best_ms(token_nll, logits, targets, repeats=a.repeats):.1f} | {diff:.2g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
