"""fp16 exports of the tests' tiny random models, verified on the CPU provider over seeds: how far the fp16 graph's
perplexity lands from torch fp32's, per model kind and seed (what docs/results.md, session 14, quotes).

    python benchmarks/fp16_cpu_perplexity_seeds.py [--kinds fwl base inplace] [--seeds 0 1 2 3 4 5]
        [--source CHECKOUT]      (another checkout's exporter, e.g. one from before session 14 for MultiHeadAttention)

Each line: kind, seed, PASS/FAIL of ``verify(chunks=16)``, torch's perplexity, the perplexity's relative error and the
worst output. The tiny FWL model predicts random tokens badly (perplexity ~1e6), so its relative perplexity error is
the graph's error in nats: a sensitive probe of the attention kernel's fp16 rounding on the CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile


def main(argv=None) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=["fwl", "base", "inplace"], choices=["fwl", "base", "inplace"])
    ap.add_argument("--seeds", nargs="+", type=int, default=list(range(6)))
    ap.add_argument("--source", default=here, help="the checkout whose exporter and tests' tiny models are used")
    a = ap.parse_args(argv)
    sys.path[:0] = [a.source, os.path.join(a.source, "tests")]
    from exporters.onnx.export import export_onnx
    from exporters.verify import verify
    from test_onnx_common import tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.kinds:
            for seed in a.seeds:
                model = tiny_model("llama", kind, seed=seed)
                out = export_onnx(model, os.path.join(tmp, f"{kind}-{seed}"), chunk_size=8, dtype="fp16")
                try:
                    rep, verdict = verify(out, against=model, chunks=16), "PASS"
                except Exception as e:  # noqa: BLE001 - a failed verify carries its report
                    rep, verdict = getattr(e, "report", None), "FAIL"
                    if rep is None:
                        raise
                p, w = rep.perplexity, rep.worst()
                print(f"{kind} seed {seed}: {verdict} perplexity {p['torch']:.4g} rel {p['rel']:.2e} "
                      f"worst {w.name} {w.rel:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
