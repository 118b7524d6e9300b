"""How the FWL head's gradient sum grows with position on a real document (CPU is enough).

    python benchmarks/fwl_update_growth.py MODEL.gguf [DOC] [--tokens 4096]

With a fixed normaliser N the fast update at position t is η · Σ_{s<t} ∇ℓ_s. For the LN shift β that sum is
Σ δh_s with δh_s = (softmax(logits_s) − onehot(y_s)) U: it needs only the base model's logits, so this prints
‖Σ_{s≤t} δh_s‖ at a few positions (and √t · mean ‖δh_s‖, the size of a sum of independent terms). A sum that grows
like t means one scalar η gives updates 4× larger at 4k tokens than at 1k.
"""
from __future__ import annotations

import argparse
import math
import os
import sysconfig

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("doc", nargs="?", default=os.path.join(sysconfig.get_paths()["stdlib"], "typing.py"))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=512)
    args = ap.parse_args()
    import fwconvert
    from fwconvert.tokenizer import load_tokenizer

    m = fwconvert.load(args.model, dtype=torch.float32).eval()
    ids = torch.tensor([load_tokenizer(args.model).encode(open(args.doc, encoding="utf-8").read())[: args.tokens + 1]])
    n = ids.shape[1] - 1
    with torch.no_grad():
        state, parts = m.init_state(1), []
        for a in range(0, n, args.chunk):
            logits, state = m.step(ids[:, a:min(a + args.chunk, n)], state)
            parts.append(logits[0])
        p = torch.softmax(torch.cat(parts), -1)
        p[torch.arange(n), ids[0, 1:n + 1]] -= 1.0
        dh = p @ m.unembed_weight  # [T, D]
    cs, norms = dh.cumsum(0), dh.norm(dim=-1)
    print(f"{'t':>6} {'|sum dh|':>10} {'sqrt(t)*mean|dh|':>17} {'|sum| / |sum at first t|':>25}")
    first = None
    for t in (64, 256, 512, 1024, 2048, 4096, 8192):
        if t > n:
            break
        s = float(cs[t - 1].norm())
        first = first or s
        print(f"{t:>6} {s:>10.1f} {float(norms[:t].mean()) * math.sqrt(t):>17.1f} {s / first:>25.2f}")


if __name__ == "__main__":
    main()
