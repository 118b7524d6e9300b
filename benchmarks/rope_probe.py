"""How fast is onnxruntime's ``com.microsoft.RotaryEmbedding`` when it sees wide heads? A probe, not part of the graphs.

onnxruntime's CUDA kernel launches one block of ``head_size`` threads per (token, head), one element per thread
(``contrib_ops/cuda/bert/rotary_embedding_impl.cu``). For SmolLM2's q·k (12 heads of 64) at batch 8 and C = 512 that
is 49,152 blocks of 64 threads: 31 µs per layer on an H100 (docs/benchmarks.md, session 14), a tenth of the copy
bandwidth. In the **interleaved** form the pairs are adjacent (2p, 2p+1) and the op's angle index is (i / 2) mod
(rotary dim / 2), so G heads whose dims are laid out interleaved can be handed to the op as ONE head of G·hd with an
angle row that repeats the hd/2 angles G times: the same arithmetic, G times fewer (and G times larger) blocks.
A graph would need the query and key weights' dims reordered within each head (2p <- p, 2p + 1 <- p + hd/2), which
leaves every q·k dot product unchanged, but leaves the keys in the cache in that order.

    python benchmarks/rope_probe.py [--provider cpu|cuda] [--batch 1 8] [--layers 30]

For each shape (SmolLM2: 9 + 3 heads of 64; the LLaMA-1B shape: 32 + 8 heads of 64) and form (narrow: the graphs'
form today; wide: G heads per op head, G the largest divisor of the head count with G·hd <= 1024) it builds one
graph of ``--layers`` chained RotaryEmbedding nodes on fp16 [B, C, N·hd], checks the wide output against the narrow
one (reordered), and on CUDA times the chain with CUDA graphs (median of 50 replays after warm-up) and prints µs per
node. Angles are per-token rows (row b·C + t, ids [B, C]) as in the graphs (exporters/onnx/rotary_form.py). Two
more columns time the narrow form with a cos/sin table indexed by position (is reading a row per token the cost?)
and the traced four-op form the fused op replaced (Mul, MatMul by the rotation matrix, Mul, Add).

Measured (H100, session 17, docs/results/s17/rope-probe.md): SmolLM2 at B = 8 narrow 36.1 µs, wide 25.7, position
table 37.0, four-op form 34.5; the 1B shape 106.3 / 64.6 / 106.2 / 102.6. So the per-token rows cost nothing, and
the kernel is far from the copy bandwidth in every form (12.6 MB per node at 36 µs is 0.35 TB/s): one 2-byte element
per thread, so G-fold wider blocks help only 1.4-1.65x.
"""
from __future__ import annotations

import numpy as np

from common import ort_run_us, probe_args
from exporters.onnx.rotary_form import group_size
from fwconvert.modeling.rope import interleaved_order

SHAPES = {"smollm2": (12, 64), "llama-1b": (40, 64)}  # (query + key heads, head dim)


def chain(layers: int, interleaved: int):
    from onnx import TensorProto as TP, helper as oh

    nodes, x = [], "x"
    for i in range(layers):
        y = f"y{i}"
        nodes.append(oh.make_node("RotaryEmbedding", [x, "ids", "cos", "sin"], [y], domain="com.microsoft",
                                  interleaved=interleaved))
        x = y
    inputs = [oh.make_tensor_value_info("x", TP.FLOAT16, None), oh.make_tensor_value_info("ids", TP.INT64, None),
              oh.make_tensor_value_info("cos", TP.FLOAT16, None), oh.make_tensor_value_info("sin", TP.FLOAT16, None)]
    graph = oh.make_graph(nodes, "rope", inputs, [oh.make_tensor_value_info(x, TP.FLOAT16, None)])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def feeds(batch: int, chunk: int, heads: int, hd: int, g: int, rng):
    """(narrow feeds, wide feeds, wide-to-narrow dim order) for one shape; the wide x is the narrow x reordered."""
    x = rng.standard_normal((batch, chunk, heads, hd)).astype(np.float16)
    f = (np.arange(chunk)[None, :, None] + 100.0) * (1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd))[None, None, :]
    f = np.broadcast_to(f, (batch, chunk, hd // 2)).reshape(batch * chunk, hd // 2)
    ids = np.arange(batch * chunk, dtype=np.int64).reshape(batch, chunk)
    order = interleaved_order(hd).numpy()
    narrow = {"x": x.reshape(batch, chunk, heads * hd), "ids": ids,
              "cos": np.cos(f).astype(np.float16), "sin": np.sin(f).astype(np.float16)}
    wide = {"x": np.ascontiguousarray(x[..., order]).reshape(batch, chunk, heads * hd), "ids": ids,
            "cos": np.tile(narrow["cos"], (1, g)), "sin": np.tile(narrow["sin"], (1, g))}
    return narrow, wide, order


def table_feeds(narrow: dict, batch: int, chunk: int, hd: int) -> dict:
    """The narrow feeds with a cos/sin table indexed by position (rows 0..chunk-1, every sequence the same
    positions) instead of one row per token: is the per-token row read what costs?"""
    return {"x": narrow["x"], "ids": np.broadcast_to(np.arange(chunk, dtype=np.int64), (batch, chunk)).copy(),
            "cos": narrow["cos"][:chunk], "sin": narrow["sin"][:chunk]}


def traced_chain(layers: int, hd: int):
    """The traced form the fused op replaces (rotary_form.py's doc): X·cos + (X @ R)·sin on [B, C, N, hd], cos/sin
    [B, C, 1, hd], R the half-rotation matrix: four kernels per node."""
    from onnx import TensorProto as TP, helper as oh, numpy_helper as nh

    h = hd // 2
    r = np.zeros((hd, hd), dtype=np.float16)
    r[np.arange(h) + h, np.arange(h)] = -1.0
    r[np.arange(h), np.arange(h) + h] = 1.0
    nodes, x = [], "x"
    for i in range(layers):
        nodes += [oh.make_node("Mul", [x, "cos"], [f"c{i}"]), oh.make_node("MatMul", [x, "R"], [f"r{i}"]),
                  oh.make_node("Mul", [f"r{i}", "sin"], [f"s{i}"]), oh.make_node("Add", [f"c{i}", f"s{i}"], [f"y{i}"])]
        x = f"y{i}"
    inputs = [oh.make_tensor_value_info(n, TP.FLOAT16, None) for n in ("x", "cos", "sin")]
    graph = oh.make_graph(nodes, "rope4", inputs, [oh.make_tensor_value_info(x, TP.FLOAT16, None)],
                          initializer=[nh.from_array(r, "R")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 10
    return model.SerializeToString()


def traced_feeds(narrow: dict, batch: int, chunk: int, heads: int, hd: int) -> dict:
    full = {k: np.concatenate([narrow[k], narrow[k]], axis=1).reshape(batch, chunk, 1, hd) for k in ("cos", "sin")}
    return {"x": narrow["x"].reshape(batch, chunk, heads, hd), **full}


def main(argv=None) -> int:
    a, prov = probe_args(__doc__, argv, layers_default=30, layers_help="chained RotaryEmbedding nodes per graph")
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    one = {form: ort.InferenceSession(chain(1, form), providers=prov) for form in (0, 1)}  # one node each, for the check
    print("| shape | B | heads × hd | G | max abs (wide vs narrow) | narrow µs/node | wide µs/node | narrow / wide "
          "| narrow, position table µs/node | traced 4-op form µs/node |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (heads, hd) in SHAPES.items():
        g = group_size(heads, hd)
        for b in a.batch:
            narrow, wide, order = feeds(b, a.chunk, heads, hd, g, rng)
            yn = one[0].run(None, narrow)[0].reshape(b, a.chunk, heads, hd)
            yw = one[1].run(None, wide)[0].reshape(b, a.chunk, heads, hd)
            err = float(np.abs(yw.astype(np.float32) - yn[..., order].astype(np.float32)).max())
            tn = tw = tt = te = float("nan")
            if a.provider == "cuda":
                out = {f"y{a.layers - 1}": (narrow["x"].shape, np.float16)}
                tn = ort_run_us(ort, chain(a.layers, 0), narrow, out, a.layers)
                tw = ort_run_us(ort, chain(a.layers, 1), wide, out, a.layers)
                tt = ort_run_us(ort, chain(a.layers, 0), table_feeds(narrow, b, a.chunk, hd), out, a.layers)
                out4 = {f"y{a.layers - 1}": ((b, a.chunk, heads, hd), np.float16)}
                te = ort_run_us(ort, traced_chain(a.layers, hd), traced_feeds(narrow, b, a.chunk, heads, hd), out4,
                                   a.layers)
            print(f"| {name} | {b} | {heads} × {hd} | {g} | {err:.3g} | {tn:.2f} | {tw:.2f} | {tn / tw:.2f} "
                  f"| {tt:.2f} | {te:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
