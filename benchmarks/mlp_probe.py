"""Can onnxruntime's MoE op run a layer's SwiGLU MLP faster as one expert? A probe on onnxruntime, not part of the graphs.

The graphs' MLP is down(SiLU(x·Wg) ⊙ (x·Wu)): three GEMMs plus two elementwise kernels (onnxruntime fuses Sigmoid·x
into QuickGelu, then the gate product), 0.50 + 0.36 ms of SmolLM2's 5.95 ms base step at B = 8 on an H100
(docs/results/s17/kernels.md). onnxruntime 1.31.1 has no SwiGLU op for dense layers, but its ``com.microsoft.MoE``
takes activation_type "swiglu" with the gate and up GEMMs fused (``swiglu_fusion`` 1: their rows interleaved,
2: concatenated) and the activation applied in between; with one expert, k = 1 and normalised routing weights its
output is the MLP's (exactly so on the CPU provider in float32, checked here in fp16). It also sorts and
un-permutes the tokens by expert, which one expert does not need: the probe says whether that costs more than it
saves.

    python benchmarks/mlp_probe.py [--provider cpu|cuda] [--batch 1 8] [--chunk 512]

Forms: ``graph`` (the graphs' MatMul/Sigmoid/Mul form), ``moe-interleaved`` and ``moe-concat`` (one MoE node). For
each shape (SmolLM2: D 576, I 1536, 30 layers; the LLaMA-1B shape: D 2048, I 8192, 8 layers, so the model stays
under protobuf's 2 GB) and batch: one graph per form of independent layers (own weights each) on x [B, C, D] fp16,
every layer's output a graph output; each MoE form's outputs against the graph form's (max abs, the same provider,
no CUDA graphs), then on CUDA each form timed with CUDA graphs (µs per layer; "failed: ..." where a form cannot be
captured or run). A form worth building beats ``graph`` at B = 1 and 8 in both shapes; the in-place layers' W_down
is a fast weight (a graph input), which a MoE's fc2 would then have to take too.

Measured (H100, session 18, docs/results/s18/mlp-probe.md), µs per layer graph / moe-interleaved / moe-concat:
SmolLM2 B = 1 23.51 / 52.78 / 50.15, B = 8 72.76 / 120.09 / 117.22; the 1B shape B = 1 122.53 / 135.65 / 133.45,
B = 8 783.19 / 831.96 / 835.29. The MoE is slower everywhere: not built. (moe-concat's outputs differ from the
MLP's on CUDA, max abs 2.3-2.7: its concatenated layout is not the one assumed here; the CPU provider refuses it.)
"""
from __future__ import annotations

import numpy as np

from common import ort_run_us, probe_args

SHAPES = {"smollm2": (576, 1536, 30), "llama-1b": (2048, 8192, 8)}  # D, I, layers
FORMS = ("graph", "moe-interleaved", "moe-concat")


def mlp_graph(form: str, weights: list) -> bytes:
    """The ONNX model of ``len(weights)`` independent MLPs of ``form``; weights[i] = (Wg [D, I], Wu [D, I], Wd [I, D])."""
    from onnx import TensorProto as TP, helper as oh, numpy_helper as nh

    nodes, inits, outs = [], [], []

    def const(name, value):
        inits.append(nh.from_array(np.ascontiguousarray(value), name))
        return name

    for i, (wg, wu, wd) in enumerate(weights):
        if form == "graph":
            nodes += [oh.make_node("MatMul", ["x", const(f"wg{i}", wg)], [f"g{i}"]),
                      oh.make_node("Sigmoid", [f"g{i}"], [f"sg{i}"]),
                      oh.make_node("Mul", [f"g{i}", f"sg{i}"], [f"silu{i}"]),
                      oh.make_node("MatMul", ["x", const(f"wu{i}", wu)], [f"u{i}"]),
                      oh.make_node("Mul", [f"silu{i}", f"u{i}"], [f"h{i}"]),
                      oh.make_node("MatMul", [f"h{i}", const(f"wd{i}", wd)], [f"y{i}"])]
        elif form in ("moe-interleaved", "moe-concat"):
            d, inter = wg.shape
            fc1 = np.empty((1, 2 * inter, d), dtype=wg.dtype)  # (experts, 2I, D): rows are output features
            if form == "moe-interleaved":
                fc1[0, 0::2], fc1[0, 1::2] = wg.T, wu.T
            else:
                fc1[0, :inter], fc1[0, inter:] = wg.T, wu.T
            nodes.append(oh.make_node("MoE", ["x", "router", const(f"fc1_{i}", fc1), "", const(f"fc2_{i}", wd.T[None])],
                                      [f"y{i}"], domain="com.microsoft", activation_type="swiglu", k=1,
                                      swiglu_fusion=1 if form == "moe-interleaved" else 2, activation_alpha=1.0,
                                      activation_beta=0.0, normalize_routing_weights=1))
        else:
            raise ValueError(f"unknown form {form!r}")
        outs.append(f"y{i}")
    inputs = [oh.make_tensor_value_info("x", TP.FLOAT16, None)]
    if form != "graph":
        inputs.append(oh.make_tensor_value_info("router", TP.FLOAT16, None))
    graph = oh.make_graph(nodes, form, inputs, [oh.make_tensor_value_info(n, TP.FLOAT16, None) for n in outs],
                          initializer=inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def form_feeds(form: str, x: np.ndarray) -> dict:
    """x, and for a MoE form the router logits of the one expert (any value: k = 1 of 1, normalised, weighs 1)."""
    if form == "graph":
        return {"x": x}
    return {"x": x, "router": np.zeros((x.shape[0] * x.shape[1], 1), dtype=np.float16)}


def main(argv=None) -> int:
    a, prov = probe_args(__doc__, argv)
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    print("| shape | B | layers | max abs vs graph | " + " | ".join(f"{f} µs/layer" for f in FORMS) + " |")
    print("|---|---|---|---|" + "---|" * len(FORMS))
    for name, (d, inter, n) in SHAPES.items():
        n = a.layers or n
        ws = [tuple((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float16) for s in ((d, inter), (d, inter),
                                                                                          (inter, d)))
              for _ in range(n)]
        blobs = {f: mlp_graph(f, ws) for f in FORMS}
        one = {f: mlp_graph(f, ws[:1]) for f in FORMS}
        for b in a.batch:
            x = rng.standard_normal((b, a.chunk, d)).astype(np.float16)
            got, errs = {}, []
            for f in FORMS:
                try:
                    got[f] = ort.InferenceSession(one[f], providers=prov).run(None, form_feeds(f, x))[0]
                except Exception as e:  # noqa: BLE001 - a form the provider refuses is a result
                    got[f] = None
                    errs.append(f"{f}: failed ({type(e).__name__})")
            for f in FORMS[1:]:
                if got[f] is not None:
                    errs.append(f"{f} {float(np.abs(got[f].astype(np.float32) - got['graph'].astype(np.float32)).max()):.3g}")
            ts = {f: "nan" for f in FORMS}
            if a.provider == "cuda":
                outs = {f"y{i}": ((b, a.chunk, d), np.float16) for i in range(n)}
                for f in FORMS:
                    try:
                        ts[f] = f"{ort_run_us(ort, blobs[f], form_feeds(f, x), outs, n):.2f}"
                    except Exception as e:  # noqa: BLE001
                        ts[f] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            print(f"| {name} | {b} | {n} | {'; '.join(errs)} | " + " | ".join(ts[f] for f in FORMS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
