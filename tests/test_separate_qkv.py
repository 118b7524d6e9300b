"""The export-form experiment FWCONVERT_EXPERIMENT_SEPARATE_QKV (exporters/onnx/graph.py::export_form): every layer
keeps its three projections and gets one RotaryEmbedding for q and one for k, so the graph has no Split at all
(the fused form has two per layer), and the export still verifies against the model (keys in the manifest's
order, fast-weight state compared)."""
import os

import onnx
import pytest

from exporters.onnx.export import export_onnx
from exporters.onnx.graph import SEPARATE_QKV
from exporters.verify import verify
from test_onnx_common import tiny_model


def _ops(out):
    return [n.op_type for n in onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph.node]


@pytest.mark.parametrize("family,kind", [("llama", "fwl"), ("qwen2", "inplace")])  # qwen2: q/k/v biases
def test_separate_projections_export_without_splits_and_verify(family, kind, tmp_path, monkeypatch):
    model = tiny_model(family, kind)
    layers = model.config.num_hidden_layers
    fused = _ops(export_onnx(model, str(tmp_path / "fused"), chunk_size=8))
    monkeypatch.setenv(SEPARATE_QKV, "1")
    out = export_onnx(model, str(tmp_path / "separate"), chunk_size=8)
    ops = _ops(out)
    assert fused.count("RotaryEmbedding") == layers and ops.count("RotaryEmbedding") == 2 * layers
    assert fused.count("Split") >= 2 * layers and ops.count("Split") == fused.count("Split") - 2 * layers
    assert ops.count("MatMul") == fused.count("MatMul") + 2 * layers
    rep = verify(out, against=model, chunks=4, batch=2)
    assert rep.passed and "past_key_values.0.key" in {r.name for r in rep.rows}
