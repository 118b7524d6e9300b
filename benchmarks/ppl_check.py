"""Perplexity of one long document: torch fp32 (fwconvert.load, streamed in chunks) vs an exported graph on ORT.

    python benchmarks/ppl_check.py MODEL EXPORTED DOC [--tokens 8192] [--chunk 512]
Prints one JSON line: both perplexities and their relative difference.
"""
import argparse
import json
import math

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("exported")
    ap.add_argument("doc")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--provider", default="cuda")
    a = ap.parse_args()
    import torch

    import fwconvert
    from exporters.runtime.session import ChunkSession
    from exporters.runtime.stream import token_losses
    from fwconvert.tokenizer import load_tokenizer

    ids = load_tokenizer(a.model).encode(open(a.doc, encoding="utf-8").read())[: a.tokens]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = fwconvert.load(a.model, device=dev, dtype=torch.float32)
    x = torch.tensor([ids], device=dev)
    state, nll = m.init_state(1), 0.0
    with torch.no_grad():
        for s in range(0, len(ids), a.chunk):
            logits, state = m.step(x[:, s:s + a.chunk], state)
            tgt = x[:, s + 1:s + a.chunk + 1]
            lp = torch.log_softmax(logits.float(), -1)[:, : tgt.shape[1]]
            nll += float(-lp.gather(-1, tgt[..., None]).sum())
    ppl_torch = math.exp(nll / (len(ids) - 1))
    sess = ChunkSession(a.exported, provider=a.provider)
    losses = token_losses(sess, np.asarray([ids], dtype=np.int64))
    ppl_ort = float(np.exp(np.mean(losses)))
    print(json.dumps({"tokens": len(ids), "ppl_torch_fp32": ppl_torch, "ppl_ort": ppl_ort, "graph": a.exported,
                      "rel_diff": abs(ppl_ort - ppl_torch) / ppl_torch, "provider": sess.provider_note}))


if __name__ == "__main__":
    main()
