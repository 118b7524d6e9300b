"""Can onnxruntime's GroupQueryAttention compute our full-attention chunk step (a chunk of C > 1 tokens after a past
of P tokens, RoPE at positions P..P+C-1, grouped heads, causal)? One GQA node with packed QKV and do_rotary=1 against
a float64 reference (RoPE, cache append, causal softmax written out), on an onnxruntime provider.

    python benchmarks/gqa_probe.py [--batch 1 2] [--provider cpu|cuda] [--dtype fp32|fp16]

Two ways to give it the angles: a position table (row p = position p; GQA derives each token's position from
seqlens_k) and our graphs' per-step rows (row b·C + t, with position_ids), padded to the total length GQA checks
for. Prints the max abs error of each, or onnxruntime's refusal (1.31.1: "batch_size must be 1 when
sequence_length > 1 and past context is given", docs/benchmarks.md, session 14). The CUDA kernel takes fp16 only.
"""
from __future__ import annotations

import argparse

import numpy as np


def reference(qkv, pk, pv, heads, kv_heads, hd, base=10000.0):
    """(output [B, C, H·hd], angles [B, C, hd/2]) of the step, float64."""
    b, c, _ = qkv.shape
    p = pk.shape[2]
    f = (p + np.arange(c))[None, :, None] * (1.0 / base ** (np.arange(0, hd, 2) / hd))[None, None, :]
    f = np.broadcast_to(f, (b, c, hd // 2))

    def rope(x):  # [B, C, N, hd]
        cos, sin = np.cos(f)[:, :, None], np.sin(f)[:, :, None]
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = qkv.astype(np.float64)
    q = rope(x[..., :heads * hd].reshape(b, c, heads, hd))
    k = rope(x[..., heads * hd:(heads + kv_heads) * hd].reshape(b, c, kv_heads, hd))
    v = x[..., (heads + kv_heads) * hd:].reshape(b, c, kv_heads, hd)
    keys = np.concatenate([pk, k.transpose(0, 2, 1, 3)], 2)
    vals = np.concatenate([pv, v.transpose(0, 2, 1, 3)], 2)
    out = np.zeros((b, c, heads, hd))
    later = np.arange(p + c)[None, :] > (p + np.arange(c))[:, None]
    for i in range(b):
        for h in range(heads):
            g = h // (heads // kv_heads)
            s = q[i, :, h] @ keys[i, g].T / np.sqrt(hd)
            s[later] = -np.inf
            w = np.exp(s - s.max(1, keepdims=True))
            out[i, :, h] = (w / w.sum(1, keepdims=True)) @ vals[i, g]
    return out.reshape(b, c, heads * hd), np.ascontiguousarray(f)


def gqa(feeds, heads, kv_heads, provider, dtype, with_ids):
    import onnxruntime as ort
    from onnx import TensorProto as TP, helper as oh

    et = TP.FLOAT16 if dtype == np.float16 else TP.FLOAT
    names = ["qkv", "", "", "pk", "pv", "seqlens", "total", "cos", "sin"] + (["pid"] if with_ids else [])
    node = oh.make_node("GroupQueryAttention", names, ["y", "present_key", "present_value"], domain="com.microsoft",
                        num_heads=heads, kv_num_heads=kv_heads, do_rotary=1)
    types = {"seqlens": TP.INT32, "total": TP.INT32, "pid": TP.INT64}
    inputs = [oh.make_tensor_value_info(n, types.get(n, et), None) for n in names if n]
    outs = [oh.make_tensor_value_info(n, et, None) for n in node.output]
    model = oh.make_model(oh.make_graph([node], "gqa", inputs, outs),
                          opset_imports=[oh.make_opsetid("", 23), oh.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    prov = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider]
    sess = ort.InferenceSession(model.SerializeToString(), providers=[prov])
    return sess.run(["y"], {k: v for k, v in feeds.items() if with_ids or k != "pid"})[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk", type=int, default=5)
    ap.add_argument("--past", type=int, default=7)
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    a = ap.parse_args(argv)
    heads, kv_heads, hd = 6, 2, 16
    dtype = np.float16 if a.dtype == "fp16" else np.float32
    rng = np.random.default_rng(0)
    for b in a.batch:
        c, p = a.chunk, a.past
        qkv = rng.standard_normal((b, c, (heads + 2 * kv_heads) * hd))
        pk, pv = (rng.standard_normal((b, kv_heads, p, hd)) for _ in range(2))
        want, f = reference(qkv, pk, pv, heads, kv_heads, hd)
        inv = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
        table = np.arange(p + c)[:, None] * inv
        rows = np.concatenate([f.reshape(b * c, hd // 2), np.zeros((p + c, hd // 2))])  # padded: GQA checks rows >= P + C
        for label, angles, ids in (("position table", table, None),
                                   ("per-step rows + position_ids", rows, np.arange(b * c).reshape(b, c))):
            feeds = {"qkv": qkv.astype(dtype), "pk": pk.astype(dtype), "pv": pv.astype(dtype),
                     "seqlens": np.full(b, p + c - 1, np.int32), "total": np.array(p + c, np.int32),
                     "cos": np.cos(angles).astype(dtype), "sin": np.sin(angles).astype(dtype), "pid": ids}
            try:
                got = gqa(feeds, heads, kv_heads, a.provider, dtype, ids is not None)
                print(f"batch {b}, {label}: max abs error {np.abs(got.astype(np.float64) - want).max():.2e}")
            except Exception as e:  # noqa: BLE001 - onnxruntime's refusal is the result
                msg = str(e).split("Status Message: ")[-1].strip().splitlines()[0]
                print(f"batch {b}, {label}: refused: {msg}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
