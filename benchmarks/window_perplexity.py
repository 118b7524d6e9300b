"""Perplexity per chunk of one long document, full attention against a sliding window (torch, CPU or CUDA).

    python benchmarks/window_perplexity.py MODEL [--text FILE] [--window 2048] [--sinks 4] [--context 8192]
        [--chunk 512] [--out-json FILE]

MODEL is anything ``fwconvert.load`` reads (a GGUF file, a model folder). The document defaults to the standard
library's ``typing.py``. Prints, and writes with ``--out-json``, the perplexity over the whole document and per
chunk for full attention, the window, and (``--sinks S``) the window with the document's first S tokens kept as
attention sinks. The window export's model (``export-onnx --attention window [--sink-tokens S]``) is this window
model, so where its per-chunk perplexity leaves the full model's is what the window costs in quality.
"""
from __future__ import annotations

import argparse
import json
import os
import sysconfig

import numpy as np
import torch

import fwconvert
from fwconvert.evaluate import stream_nll
from fwconvert.tokenizer import load_tokenizer


def chunk_perplexities(model, ids: torch.Tensor, chunk: int) -> dict:
    """Perplexity over ``ids [1, L]`` streamed in chunks, overall and per chunk."""
    nll = stream_nll(model.step, lambda b: model.init_state(b), ids, chunk)[0]
    per = [float(np.exp(float(nll[a:a + chunk].mean()))) for a in range(0, nll.numel(), chunk)]
    return {"perplexity": float(torch.exp(nll.mean())), "chunk_perplexity": [round(p, 3) for p in per]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--text", default=os.path.join(sysconfig.get_paths()["stdlib"], "typing.py"))
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--sinks", type=int, default=0, help="also the window with this many attention sinks")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-json")
    a = ap.parse_args(argv)
    tok = load_tokenizer(a.model)
    with open(a.text, encoding="utf-8") as f:
        ids = np.asarray(tok.encode(f.read()))[: a.context]
    ids = torch.as_tensor(ids, dtype=torch.long, device=a.device)[None]
    out = {"model": a.model, "text": a.text, "tokens": int(ids.shape[1]), "chunk": a.chunk, "window": a.window,
           "sinks": a.sinks}
    forms = [("full", None, 0), ("window", a.window, 0)] + ([("window+sinks", a.window, a.sinks)] if a.sinks else [])
    with torch.no_grad():
        for name, w, sinks in forms:
            model = fwconvert.load(a.model, device=a.device, window=w, sinks=sinks).eval()
            out[name] = chunk_perplexities(model, ids, a.chunk)
            print(name, json.dumps(out[name]), flush=True)
    if a.out_json:
        tmp = a.out_json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, a.out_json)
    return out


if __name__ == "__main__":
    main()
