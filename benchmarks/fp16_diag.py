"""Which positions make an fp16 graph miss the logits tolerance? Streams `verify`'s own random tokens through
torch fp32 (CPU, the reference), torch fp16 (CUDA) and the exported graph (ORT CUDA), chunk by chunk, and prints
per chunk: the logits' relative error of both fp16 paths, and for the worst positions their error, token id and
the size of the residual stream entering the final norm (torch fp32).

    python benchmarks/fp16_diag.py EXPORTED_FP16 MODEL [--chunks 16] [--top 4]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fwconvert  # noqa: E402
from exporters.runtime.session import ChunkSession  # noqa: E402
from exporters.verify import _tokens  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("exported")
    ap.add_argument("model")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    a = ap.parse_args()
    sess = ChunkSession(a.exported, provider=a.device)
    m32 = fwconvert.load(a.model, dtype=torch.float32).eval()
    m16 = fwconvert.load(a.model, dtype=torch.float16, device=a.device).eval()
    resid = {}
    m32.model.norm.register_forward_hook(lambda mod, inp, out: resid.__setitem__("h", inp[0].detach()))
    ids = _tokens(sess, a.chunks, 1, 0, None)
    c = sess.chunk_size
    st, s32, s16 = sess.new_state(1), m32.init_state(1), m16.init_state(1)
    with torch.no_grad():
        for k, lo in enumerate(range(0, ids.shape[1], c)):
            chunk = ids[:, lo:lo + c]
            l_ort = sess.step(chunk, st).astype(np.float64)[0]
            l32, s32 = m32.step(torch.from_numpy(chunk), s32)
            l16, s16 = m16.step(torch.from_numpy(chunk).to(a.device), s16)
            l32 = l32[0].double().numpy()
            l16 = l16[0].double().cpu().numpy()
            h = resid["h"][0]
            err = np.linalg.norm(l_ort - l32, axis=-1) / np.linalg.norm(l32, axis=-1)
            err16 = np.linalg.norm(l16 - l32, axis=-1) / np.linalg.norm(l32, axis=-1)
            worst = np.argsort(-err)[: a.top]
            print(json.dumps({
                "chunk": k, "ort_fp16_rel": round(rel(l_ort, l32), 5), "torch_fp16_rel": round(rel(l16, l32), 5),
                "median_pos_err_ort": round(float(np.median(err)), 5),
                "worst": [{"pos": int(lo + p), "token": int(chunk[0, p]), "err_ort": round(float(err[p]), 4),
                           "err_torch16": round(float(err16[p]), 4), "logit_norm": round(float(np.linalg.norm(l32[p])), 1),
                           "resid_max_abs": round(float(h[p].abs().max()), 1),
                           "argmax_same": bool(l_ort[p].argmax() == l32[p].argmax())} for p in worst],
                "resid_max_abs_chunk": round(float(h.abs().max()), 1)}))


if __name__ == "__main__":
    main()
