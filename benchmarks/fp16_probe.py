"""How far is fp16 from fp32 in PyTorch itself? Streams random tokens (as `verify` does) and real text through
the same model in fp32 and in fp16 (model.half()), chunk by chunk, printing the logits' relative error per chunk.

    python benchmarks/fp16_probe.py MODEL [--doc FILE] [--chunks 16] [--chunk 512]
"""
import argparse
import json

import torch

import fwconvert


def stream(m, ids, chunk):
    state, outs = m.init_state(ids.shape[0]), []
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            logits, state = m.step(ids[:, s:s + chunk], state)
            outs.append(logits.float())
    return outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--doc")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512)
    a = ap.parse_args()
    m32 = fwconvert.load(a.model, device="cuda", dtype=torch.float32)
    m16 = fwconvert.load(a.model, device="cuda", dtype=torch.float16)
    n = a.chunks * a.chunk
    inputs = {"random": torch.randint(0, m32.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))}
    if a.doc:
        from fwconvert.tokenizer import load_tokenizer

        inputs["text"] = torch.tensor([load_tokenizer(a.model).encode(open(a.doc, encoding="utf-8").read())[:n]])
    for name, ids in inputs.items():
        ids = ids.cuda()
        o32, o16 = stream(m32, ids, a.chunk), stream(m16, ids, a.chunk)
        rel = [float((x - y).norm() / y.norm()) for x, y in zip(o16, o32)]
        print(json.dumps({"model": a.model, "input": name, "max_rel": max(rel), "rel_per_chunk": [round(r, 5) for r in rel]}))


if __name__ == "__main__":
    main()
