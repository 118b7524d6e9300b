"""How should a layer's q, k and v leave their projection? A probe of three forms on onnxruntime, not part of the graphs.

Up to session 17 the graphs' form was **fused**: one MatMul for q, k and v, a Split of its output into [q·k | v],
one RotaryEmbedding over q·k (wide heads), and a Split of that into q and k. The two Splits copy q, k and v once
more each: SmolLM2's base step on an H100 spent 0.43 ms of 5.95 at B = 8 and 0.19 ms of 2.20 at B = 1 in
``_SplitSmallInnerKernel`` (docs/results/s17/kernels.md). The other forms trade the copies for more, smaller
launches:

    fused      MatMul(x, Wqkv) -> Split [q·k | v] -> RoPE(q·k) -> Split [q | k]          (the graphs up to session 17)
    qk+v       MatMul(x, Wqk) -> RoPE(q·k) -> Split [q | k];  MatMul(x, Wv)                (one Split)
    separate   MatMul(x, Wq) -> RoPE(q);  MatMul(x, Wk) -> RoPE(k);  MatMul(x, Wv)          (no Split; the graphs since session 18)

    python benchmarks/qkv_probe.py [--provider cpu|cuda] [--batch 1 8] [--chunk 512]

For each shape (SmolLM2: D 576, 9 + 3 heads of 64, 30 layers; the LLaMA-1B shape: D 2048, 32 + 8 heads of 64, 16
layers) and batch it builds one graph per form with the shape's number of independent layers on x [B, C, D] fp16
(each layer its own weights, so onnxruntime cannot merge them; every q, k and v a graph output), checks each form's
outputs against the fused form's (max abs), and on CUDA times each with CUDA graphs (µs per layer). RoPE as in the
graphs: interleaved, G heads per op head (``rotary_form.group_size``), one cos/sin row per token.

Measured (H100, session 18, docs/results/s18/qkv-probe.md), µs per layer fused / qk+v / separate: SmolLM2 B = 1
19.24 / 18.66 / 20.95, B = 8 56.58 / 52.46 / 42.24; the 1B shape B = 1 36.68 / 40.80 / 42.35, B = 8 197.08 / 171.06
/ 155.05. No form wins everywhere; separate saves the most at B = 8 and loses a little at B = 1. In whole graphs
(docs/benchmarks.md, session 18) separate took SmolLM2's base step 5.91 -> 5.63 ms at B = 8 (2.21 -> 2.21 at B = 1)
and the 1B shape's 21.32 -> 20.77 (3.39 -> 3.46), so it became the graphs' only form.
"""
from __future__ import annotations

import numpy as np

from common import ort_run_us, probe_args
from exporters.onnx.rotary_form import group_size

SHAPES = {"smollm2": (576, 9, 3, 64, 30), "llama-1b": (2048, 32, 8, 64, 16)}  # D, heads, KV heads, hd, layers
FORMS = ("fused", "qk+v", "separate")


def layer_graph(form: str, weights: list, h: int, kv: int, hd: int) -> bytes:
    """The ONNX model of ``len(weights)`` independent layers of ``form``; weights[i] = Wqkv [D, (h + 2 kv) hd]."""
    from onnx import TensorProto as TP, helper as oh, numpy_helper as nh

    nodes, inits, outs, used = [], [], [], set()

    def const(name, value):
        inits.append(nh.from_array(value, name))
        return name

    def rope(x, heads, name):
        g = group_size(heads, hd)
        used.add(g)
        nodes.append(oh.make_node("RotaryEmbedding", [x, "ids", f"cos{g}", f"sin{g}"], [name], domain="com.microsoft",
                                  interleaved=1))
        return name

    def split(x, sizes, names):
        nodes.append(oh.make_node("Split", [x, const(f"{names[0]}_sizes", np.array(sizes, dtype=np.int64))], names,
                                  axis=-1))

    def matmul(w, name):
        nodes.append(oh.make_node("MatMul", ["x", w], [name]))
        return name

    q, k = h * hd, kv * hd
    for i, w in enumerate(weights):
        if form == "fused":
            split(matmul(const(f"w{i}", w), f"qkv{i}"), [q + k, k], [f"qk{i}", f"v{i}"])
            split(rope(f"qk{i}", h + kv, f"qkr{i}"), [q, k], [f"q{i}", f"k{i}"])
        elif form == "qk+v":
            rope(matmul(const(f"wqk{i}", w[:, :q + k].copy()), f"qk{i}"), h + kv, f"qkr{i}")
            split(f"qkr{i}", [q, k], [f"q{i}", f"k{i}"])
            matmul(const(f"wv{i}", w[:, q + k:].copy()), f"v{i}")
        elif form == "separate":
            rope(matmul(const(f"wq{i}", w[:, :q].copy()), f"qp{i}"), h, f"q{i}")
            rope(matmul(const(f"wk{i}", w[:, q:q + k].copy()), f"kp{i}"), kv, f"k{i}")
            matmul(const(f"wv{i}", w[:, q + k:].copy()), f"v{i}")
        else:
            raise ValueError(f"unknown form {form!r}")
        outs += [(f"q{i}", q), (f"k{i}", k), (f"v{i}", k)]
    inputs = [oh.make_tensor_value_info("x", TP.FLOAT16, None), oh.make_tensor_value_info("ids", TP.INT64, None)]
    inputs += [oh.make_tensor_value_info(f"{fn}{g}", TP.FLOAT16, None) for g in sorted(used) for fn in ("cos", "sin")]
    graph = oh.make_graph(nodes, form, inputs, [oh.make_tensor_value_info(n, TP.FLOAT16, None) for n, _ in outs],
                          initializer=inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def feeds(batch: int, chunk: int, d: int, h: int, kv: int, hd: int, rng) -> dict:
    """x [B, C, D], ids [B, C] (row b·C + t) and the cos/sin rows of every op-head width the forms use."""
    f = (np.arange(chunk)[None, :, None] + 100.0) * (1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd))[None, None, :]
    f = np.broadcast_to(f, (batch, chunk, hd // 2)).reshape(batch * chunk, hd // 2)
    out = {"x": rng.standard_normal((batch, chunk, d)).astype(np.float16),
           "ids": np.arange(batch * chunk, dtype=np.int64).reshape(batch, chunk)}
    for g in {group_size(n, hd) for n in (h + kv, h, kv)}:
        out[f"cos{g}"] = np.tile(np.cos(f), (1, g)).astype(np.float16)
        out[f"sin{g}"] = np.tile(np.sin(f), (1, g)).astype(np.float16)
    return out


def used_feeds(blob: bytes, all_feeds: dict) -> dict:
    import onnx

    names = {i.name for i in onnx.load_from_string(blob).graph.input}
    return {k: v for k, v in all_feeds.items() if k in names}


def main(argv=None) -> int:
    a, prov = probe_args(__doc__, argv)
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    print("| shape | B | layers | max abs vs fused (qk+v, separate) | " + " | ".join(f"{f} µs/layer" for f in FORMS)
          + " |")
    print("|---|---|---|---|" + "---|" * len(FORMS))
    for name, (d, h, kv, hd, n) in SHAPES.items():
        n = a.layers or n
        ws = [(rng.standard_normal((d, (h + 2 * kv) * hd)) / np.sqrt(d)).astype(np.float16) for _ in range(n)]
        blobs = {f: layer_graph(f, ws, h, kv, hd) for f in FORMS}
        one = {f: layer_graph(f, ws[:1], h, kv, hd) for f in FORMS}
        for b in a.batch:
            fd = feeds(b, a.chunk, d, h, kv, hd, rng)
            got = {f: ort.InferenceSession(one[f], providers=prov).run(None, used_feeds(one[f], fd)) for f in FORMS}
            errs = [max(float(np.abs(x.astype(np.float32) - y.astype(np.float32)).max())
                        for x, y in zip(got[f], got["fused"])) for f in FORMS[1:]]
            ts = {f: float("nan") for f in FORMS}
            if a.provider == "cuda":
                outs = {f"{p}{i}": ((b, a.chunk, (h if p == "q" else kv) * hd), np.float16)
                        for i in range(n) for p in "qkv"}
                ts = {f: ort_run_us(ort, blobs[f], used_feeds(blobs[f], fd), outs, n) for f in FORMS}
            print(f"| {name} | {b} | {n} | {', '.join(f'{e:.3g}' for e in errs)} | "
                  + " | ".join(f"{ts[f]:.2f}" for f in FORMS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
