"""Transposed and cast weights as initializers of their own (exporters/onnx/weight_layout.py): the rewrite is exact,
keeps the original where something else reads it, and leaves onnxruntime nothing weight-sized to fold per session."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from exporters.onnx.weight_layout import folded_weights

V, D = 40, 12


def _tied_head_graph(tmp_path, untied: bool = False, twice: bool = False) -> str:
    """ids -> Gather(U) -> MatMul(·, Transpose(U or W)): a tied (or untied) unembedding as the exporter leaves it
    (``twice``: a second logits product through a Transpose of its own, added to the first)."""
    rng = np.random.default_rng(0)
    u = rng.standard_normal((V, D)).astype(np.float32)
    inits = [numpy_helper.from_array(u, "U")]
    head = "U"
    if untied:
        inits.append(numpy_helper.from_array(rng.standard_normal((V, D)).astype(np.float32), "W"))
        head = "W"
    nodes = [helper.make_node("Gather", ["U", "ids"], ["h"]),
             helper.make_node("Transpose", [head], ["ut"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "ut"], ["logits" if not twice else "l1"])]
    if twice:
        nodes += [helper.make_node("Transpose", [head], ["ut2"], perm=[1, 0]),
                  helper.make_node("MatMul", ["h", "ut2"], ["l2"]), helper.make_node("Add", ["l1", "l2"], ["logits"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", V])], inits)
    path = str(tmp_path / f"{'untied' if untied else 'tied'}{'-twice' if twice else ''}.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return path


def _rewrite(path: str, count: int = 1) -> str:
    import onnx_ir as ir

    model = ir.load(path)
    assert folded_weights(model.graph) == count
    out = path.replace(".onnx", ".rewritten.onnx")
    ir.save(model, out)
    return out


def _run(path, ids):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def test_tied_unembedding_becomes_a_shared_initializer(tmp_path):
    src = _tied_head_graph(tmp_path)
    out = _rewrite(src)
    m = onnx.load(out)
    assert [n.op_type for n in m.graph.node] == ["Gather", "MatMul"]
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    assert set(inits) == {"U", "U.transposed"}  # the Gather still reads U
    assert np.array_equal(inits["U.transposed"], inits["U"].T)
    ids = np.array([[1, 5, 39], [0, 2, 7]], dtype=np.int64)
    assert np.array_equal(_run(out, ids), _run(src, ids))  # exact: the same products in the same layout


def test_untied_head_keeps_one_copy(tmp_path):
    out = _rewrite(_tied_head_graph(tmp_path, untied=True))
    names = {i.name for i in onnx.load(out).graph.initializer}
    assert names == {"U", "W.transposed"}  # W is read by nothing else: dropped


def test_onnxruntime_folds_nothing_weight_sized_after_the_rewrite(tmp_path):
    """Before the rewrite onnxruntime makes a [D, V] constant of its own when the session loads (one per session);
    after it, the session's optimized graph holds only the stored initializers."""
    def folded(path):
        so = ort.SessionOptions()
        so.optimized_model_filepath = path + ".opt.onnx"
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return {i.name for i in onnx.load(so.optimized_model_filepath).graph.initializer}

    src = _tied_head_graph(tmp_path)
    assert folded(src) - {"U"}  # onnxruntime's own folded transpose: the per-session copy
    assert folded(_rewrite(src)) == {"U", "U.transposed"}


def test_disk_estimate_counts_the_transposed_tied_unembedding():
    """export's disk preflight counts the tied unembedding twice (the graph stores Uᵀ beside U)."""
    from exporters.onnx.export import _estimate_bytes
    from test_onnx_common import tiny_model

    model = tiny_model("llama")
    cfg = model.config
    assert cfg.tie_word_embeddings
    params = sum(p.numel() for p in model.parameters())
    assert _estimate_bytes(model, None, "fp16") == (params + cfg.vocab_size * cfg.hidden_size) * 2 + (1 << 20)


def test_two_transposes_of_one_weight_share_one_copy(tmp_path):
    src = _tied_head_graph(tmp_path, twice=True)
    out = _rewrite(src, count=2)
    assert {i.name for i in onnx.load(out).graph.initializer} == {"U", "U.transposed"}
    ids = np.array([[3, 4]], dtype=np.int64)
    assert np.array_equal(_run(out, ids), _run(src, ids))


def test_cast_of_a_transposed_weight_folds_too(tmp_path):
    """fp16 W -> Transpose -> Cast(fp32) -> MatMul with fp32 activations (the FWL head's form): both fold, in order."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((V, D)).astype(np.float16)
    nodes = [helper.make_node("Transpose", ["W"], ["wt"], perm=[1, 0]),
             helper.make_node("Cast", ["wt"], ["wt32"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "wt32"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", V])],
                          [numpy_helper.from_array(w, "W")])
    src = str(tmp_path / "cast.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), src)
    out = _rewrite(src, count=2)
    m = onnx.load(out)
    assert [n.op_type for n in m.graph.node] == ["MatMul"]
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    assert list(inits) == ["W.transposed.float"] and inits["W.transposed.float"].dtype == np.float32
    assert np.array_equal(inits["W.transposed.float"], w.T.astype(np.float32))
    x = rng.standard_normal((3, D)).astype(np.float32)
    run = lambda p: ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    assert np.array_equal(run(out), run(src))
