"""What one FWL update path can buy on its own: perplexity by position for a range of step sizes of that path,
all others 0, on a converted (not calibrated) FWL model.

    python benchmarks/fwl_step_sweep.py FWL_MODEL DOC.py [DOC.py ...] [--path beta] [--etas 0 1e-3 3e-3]
           [--context 8192] [--chunk 512] [--json OUT]

At conversion the head's slow block is inactive (γ = β = 0), so with only β's step size η set the head adds
r_t = −η Σ_{s<t} δh_s = η Σ_{s<t} (e_{y_s} − p_s) Uᵀ to the final hidden state: the logits gain
η Σ_{s<t} (e_{y_s} − p_s) U Uᵀ, a cache of the document's tokens in embedding space that grows with position
(N fixed, as the spec requires). The sweep shows the best η per position bucket: if the best η at 0-512 differs
from the best at 4k-8k, one learned scalar cannot serve both (docs/results.md, session 3: the update's norm grows
linearly with position). Torch, fp32, the device given (CPU by default); documents are tokenized with the model's
tokenizer and cut to --context tokens (shorter ones are skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sweep(model_path: str, docs: list, path: str, etas: list, context: int, chunk: int, device: str = "cpu") -> dict:
    import fwconvert
    from fwconvert.evaluate import evaluate_stream, torch_runner
    from fwconvert.fastweights.fwl import STEP_SIZE_NAMES
    from fwconvert.tokenizer import load_tokenizer

    model = fwconvert.load(model_path, device=device).eval()
    if model.fwl_head is None:
        raise SystemExit(f"{model_path}: not an FWL model")
    if path not in STEP_SIZE_NAMES:
        raise SystemExit(f"--path must be one of {', '.join(STEP_SIZE_NAMES)}")
    tok = load_tokenizer(model_path)
    ids = []
    for d in docs:
        t = tok.encode(open(d, encoding="utf-8").read())
        if len(t) >= context:
            ids.append(np.asarray(t[:context], dtype=np.int64))
    if not ids:
        raise SystemExit(f"no document has {context} tokens")
    step, init = torch_runner(model)
    out = {"model": model_path, "path": path, "context": context, "chunk": chunk, "documents": len(ids), "runs": {}}
    with torch.no_grad():
        for eta in etas:
            model.fwl_head.step_sizes.zero_()
            model.fwl_head.step_sizes[STEP_SIZE_NAMES.index(path)] = float(eta)
            s = evaluate_stream(step, init, ids, context, chunk, device, batch_size=len(ids)).summary()
            out["runs"][str(eta)] = {"perplexity": s["perplexity"], "by_position": s["by_position"]}
            print(f"eta {eta:g}: {s['perplexity']:.4f} " + " ".join(f"{k} {v:.3f}" for k, v in s["by_position"].items()),
                  file=sys.stderr)
    return out


def markdown(res: dict) -> str:
    runs = res["runs"]
    buckets = list(next(iter(runs.values()))["by_position"])
    base = runs.get("0") or runs.get("0.0")
    lines = [f"| η ({res['path']}) | " + " | ".join(buckets) + " | overall | vs η = 0 |",
             "|" + "---|" * (len(buckets) + 3)]
    for eta, r in runs.items():
        rel = f"{r['perplexity'] / base['perplexity'] - 1:+.1%}" if base else ""
        lines.append(f"| {eta} | " + " | ".join(f"{r['by_position'][b]:.3f}" for b in buckets)
                     + f" | {r['perplexity']:.4f} | {rel} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("docs", nargs="+")
    ap.add_argument("--path", default="beta", help="the step size to sweep (others stay 0)")
    ap.add_argument("--etas", type=float, nargs="+", default=[0.0, 1e-3, 3e-3, 1e-2])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    res = sweep(a.model, a.docs, a.path, a.etas, a.context, a.chunk, a.device)
    print(markdown(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
