"""Splits along the last axis only (exporters/onnx/split_form.py): the rewrite is exact, and exported graphs keep no
split along an inner axis (onnxruntime's CUDA kernel uploads four arrays per call for those)."""
import os

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from exporters.onnx.export import export_onnx
from exporters.onnx.ir_values import shape_of, split_sizes
from exporters.onnx.split_form import splits_on_last_axis
from exporters.verify import verify
from test_onnx_common import tiny_model


def _split_model(dims, axis, sizes):
    """x [dims] -> Split(axis, sizes) -> each part times 1 (so the parts are consumed by another node)."""
    parts = [f"p{i}" for i in range(len(sizes))]
    nodes = [helper.make_node("Split", ["x", "sizes"], parts, axis=axis)]
    nodes += [helper.make_node("Mul", [p, "one"], [f"y{i}"]) for i, p in enumerate(parts)]
    graph = helper.make_graph(
        nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(sizes))],
        initializer=[helper.make_tensor("sizes", TensorProto.INT64, [len(sizes)], sizes),
                     helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


@pytest.mark.parametrize("dims,axis,sizes,rewritten", [
    (["B", "T", 12, 4], 2, [9, 3], 1),  # the query/key head split
    (["B", 5, 3, 2], 1, [1, 4], 1),
    (["B", "T", 12, 4], -2, [6, 6], 1),  # a negative axis
    (["B", "T", 20], 2, [16, 4], 0),  # already along the last axis
    (["B", "T", 4, "H"], 2, [2, 2], 0),  # a dynamic dim after the axis: left alone
])
def test_split_along_the_last_axis_is_exact(dims, axis, sizes, rewritten):
    before = _split_model(dims, axis, sizes)
    m = ir.serde.deserialize_model(before)
    assert splits_on_last_axis(m.graph) == rewritten
    after = ir.serde.serialize_model(m)
    concrete = [{"B": 2, "T": 3, "H": 5}.get(d, d) for d in dims]
    x = np.random.default_rng(0).standard_normal(concrete).astype(np.float32)
    want, got = _run(before, x), _run(after, x)
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.shape == b.shape and np.array_equal(a, b)
    for n in m.graph:
        if n.op_type == "Split" and rewritten:
            d = shape_of(n.inputs[0])
            assert split_sizes(n, len(d))[0] == len(d) - 1


def _inner_splits(folder):
    m = ir.load(os.path.join(folder, "model.onnx"))
    out = []
    for n in m.graph:
        if n.op_type == "Split":
            d = shape_of(n.inputs[0])
            if d is None or split_sizes(n, len(d))[0] != len(d) - 1:
                out.append((n.name, d))
    return out


@pytest.mark.parametrize("family,kind,dtype", [("llama", "base", "fp16"), ("qwen2", "inplace", "fp32"), ("llama", "fwl", "fp32")])
def test_exports_split_only_along_the_last_axis(tmp_path, family, kind, dtype):
    model = tiny_model(family, kind=kind, seed=4)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8, dtype=dtype)
    assert _inner_splits(out) == []
    assert verify(out, against=model, chunks=3, batch=2).passed
