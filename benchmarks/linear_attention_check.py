"""onnxruntime's ``com.microsoft.LinearAttention`` against the form our FWL graphs use, on FWL's shapes (issue #7 asks
to check whether the op could carry the fast-weight math).

    python benchmarks/linear_attention_check.py --provider cuda --batch 1 8 --md la.md --json la.jsonl

The FWL head's updates are three strictly causal linear attentions with a carried prefix per chunk step
(``fwconvert/fastweights/fwl.py``; keys shifted by one, so inclusive of t in the step's own indexing):

    out_t = q_t P + sum_{j <= t} (q_t . k_j) v_j        new prefix = P + K^T V

layer 1: d_k = D + 1, d_v = 4D; layer 2: d_k = 4D + 1, d_v = D (SmolLM2: D = 576), fp32. Three graphs per shape:

* ``masked``: what the FWL export traces for one chunk (chunk=None): q P + ((q K^T) masked to j <= t) V, and P + K^T V.
* ``la``: LinearAttention(update_rule="linear", scale=1, one head), past_state = P[:, None]. onnxruntime 1.31.1's CPU
  kernel takes any head size; its CUDA kernels need d_k in {64, 128} (or a shared-memory recurrence that needs
  d_k * d_v fp32 words of shared memory): expected to be refused on CUDA at these shapes.
* ``la128``: the same with d_k zero-padded to G * 128 and split into G heads (values tiled G times, per-head outputs
  summed): the form the CUDA kernels accept. Every CUDA path walks the tokens one by one (no chunked matmuls).

Each graph's outputs are checked against a float64 reference (relative error, max |a - b| / max |b|) and timed with
inputs and outputs bound on the device (median of --iters after warm-up). A graph the provider refuses is reported
with its error, not dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, time_fn  # noqa: E402

GROUP = 128  # key width per head that the CUDA column kernels take


def _model(nodes, inits, dk: int, dv: int):
    from onnx import TensorProto, helper, numpy_helper

    f32 = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("q", f32, ["B", "T", dk]), helper.make_tensor_value_info("k", f32, ["B", "T", dk]),
           helper.make_tensor_value_info("v", f32, ["B", "T", dv]), helper.make_tensor_value_info("P", f32, ["B", dk, dv])]
    outs = [helper.make_tensor_value_info("out", f32, ["B", "T", dv]), helper.make_tensor_value_info("state", f32, ["B", dk, dv])]
    init = [numpy_helper.from_array(np.asarray(a), name) for name, a in inits.items()]
    graph = helper.make_graph(nodes, "linear_attention_check", ins, outs, initializer=init)
    # IR 10 / opset 21: what onnxruntime 1.31 loads (it refuses IR 14, onnx's default)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def masked_graph(dk: int, dv: int, t: int):
    """The FWL export's form for one chunk of ``t`` tokens."""
    from onnx import helper

    n = helper.make_node
    nodes = [n("MatMul", ["q", "P"], ["qp"]), n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             n("MatMul", ["q", "kt"], ["s"]), n("Mul", ["s", "tril"], ["sm"]), n("MatMul", ["sm", "v"], ["sv"]),
             n("Add", ["qp", "sv"], ["out"]), n("MatMul", ["kt", "v"], ["kv"]), n("Add", ["P", "kv"], ["state"])]
    return _model(nodes, {"tril": np.tril(np.ones((t, t), np.float32))}, dk, dv)


def la_graph(dk: int, dv: int):
    from onnx import helper

    n = helper.make_node
    nodes = [n("Unsqueeze", ["P", "ax1"], ["P4"]),
             n("LinearAttention", ["q", "k", "v", "P4"], ["out", "S4"], domain="com.microsoft", q_num_heads=1,
               kv_num_heads=1, update_rule="linear", scale=1.0),
             n("Squeeze", ["S4", "ax1"], ["state"])]
    return _model(nodes, {"ax1": np.array([1], np.int64)}, dk, dv)


def la_split_graph(dk: int, dv: int, group: int = GROUP):
    """d_k padded to G * group and split into G heads; the per-head outputs summed, the state cut back to d_k rows."""
    from onnx import helper

    g = -(-dk // group)
    pad = g * group - dk
    n = helper.make_node
    nodes = [n("Pad", ["q", "pad_qk"], ["qp"]), n("Pad", ["k", "pad_qk"], ["kp"]), n("Tile", ["v", "rep"], ["vt"]),
             n("Pad", ["P", "pad_p"], ["pp"]), n("Reshape", ["pp", "shape_p"], ["P4"]),
             n("LinearAttention", ["qp", "kp", "vt", "P4"], ["og", "S4"], domain="com.microsoft", q_num_heads=g,
               kv_num_heads=g, update_rule="linear", scale=1.0),
             n("Reshape", ["og", "shape_o"], ["og4"]), n("ReduceSum", ["og4", "ax2"], ["out"], keepdims=0),
             n("Reshape", ["S4", "shape_s"], ["sp"]), n("Slice", ["sp", "zero", "dk", "ax1"], ["state"])]
    i64 = lambda a: np.array(a, np.int64)  # noqa: E731
    inits = {"pad_qk": i64([0, 0, 0, 0, 0, pad]), "rep": i64([1, 1, g]), "pad_p": i64([0, 0, 0, 0, pad, 0]),
             "shape_p": i64([0, g, group, dv]), "shape_o": i64([0, 0, g, dv]), "ax2": i64([2]),
             "shape_s": i64([0, g * group, dv]), "zero": i64([0]), "dk": i64([dk]), "ax1": i64([1])}
    return _model(nodes, inits, dk, dv)


def reference(q, k, v, p):
    """float64 (out, state) of the strictly causal form (keys already shifted: j <= t)."""
    q, k, v, p = (a.astype(np.float64) for a in (q, k, v, p))
    t = q.shape[1]
    scores = (q @ k.transpose(0, 2, 1)) * np.tril(np.ones((t, t)))
    return q @ p + scores @ v, p + k.transpose(0, 2, 1) @ v


def rel(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def run_one(model, feeds: dict, provider: str, iters: int, want) -> dict:
    """rel errors and median ms with device-bound IO, or the provider's refusal."""
    import onnxruntime as ort

    prov = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[provider]
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=[prov])
        dev = "cuda" if provider == "cuda" else "cpu"
        vals = {k: ort.OrtValue.ortvalue_from_numpy(a, dev, 0) for k, a in feeds.items()}
        b = sess.io_binding()
        for k, val in vals.items():
            b.bind_ortvalue_input(k, val)
        for name in ("out", "state"):
            b.bind_output(name, dev)
        sess.run_with_iobinding(b)
        out, state = (o.numpy() for o in b.get_outputs())
        ms = time_fn(lambda: sess.run_with_iobinding(b), warmup=3, iters=iters, sync=b.synchronize_outputs)
    except Exception as e:  # noqa: BLE001 -- a refusal is a result here
        return {"ok": False, "error": str(e).splitlines()[0][:200]}
    return {"ok": True, "ms": round(ms, 3), "rel_out": rel(out, want[0]), "rel_state": rel(state, want[1])}


def shapes(hidden: int):
    """FWL's two dense updates: (name, d_k, d_v)."""
    return [("layer 1", hidden + 1, 4 * hidden), ("layer 2", 4 * hidden + 1, hidden)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--provider", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--hidden", type=int, default=576, help="D of the model (SmolLM2: 576)")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None, help="append one JSON line per measurement")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for name, dk, dv in shapes(a.hidden):
        graphs = {"masked": masked_graph(dk, dv, a.chunk), "la": la_graph(dk, dv), "la128": la_split_graph(dk, dv)}
        for b in a.batch:
            # scaled like the FWL's signals (q.k of order 1) so fp32 rounding stays readable in the rel errors
            scale = np.float32(dk ** -0.5)
            feeds = {"q": rng.standard_normal((b, a.chunk, dk), np.float32) * scale,
                     "k": rng.standard_normal((b, a.chunk, dk), np.float32) * scale,
                     "v": rng.standard_normal((b, a.chunk, dv), np.float32),
                     "P": rng.standard_normal((b, dk, dv), np.float32)}
            want = reference(feeds["q"], feeds["k"], feeds["v"], feeds["P"])
            for form, model in graphs.items():
                r = {"shape": name, "d_k": dk, "d_v": dv, "batch": b, "chunk": a.chunk, "form": form,
                     "provider": a.provider, **run_one(model, feeds, a.provider, a.iters, want)}
                rows.append(r)
                print(json.dumps(r), flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
    table = [{**r, "ms": r.get("ms", "refused"), "rel out / state": f"{r['rel_out']:.1e} / {r['rel_state']:.1e}"
              if r["ok"] else r["error"]} for r in rows]
    md = markdown_table(table, ["shape", "d_k", "d_v", "batch", "form", "ms", "rel out / state"])
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(f"LinearAttention check, provider {a.provider}, chunk {a.chunk}, fp32\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
