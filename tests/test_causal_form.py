"""The causal-attention-over-the-past form of full-attention graphs (exporters/onnx/causal_form.py, an experiment
switched on by FWCONVERT_EXPERIMENT_CAUSAL_MHA=1): exact against torch over chained chunks (the past growing from
0), on the CPU provider, whose MultiHeadAttention masks bottom-right like the CUDA flash kernel the form is for."""
import os
import shutil

import onnx
import pytest

from exporters.onnx.causal_form import EXPERIMENT_ENV
from exporters.onnx.export import export_onnx
from exporters.verify import verify
from test_onnx_common import tiny_model


def _attentions(folder):
    g = onnx.load(os.path.join(folder, "model.onnx")).graph
    return [n for n in g.node if n.op_type == "MultiHeadAttention"]


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("family,kind,dtype", [("llama", "base", "fp32"), ("llama", "fwl", "fp32"),
                                               ("qwen2", "inplace", "fp32"), ("llama", "inplace", "fp16")])
def test_causal_form_is_exact(tmp_path, monkeypatch, family, kind, dtype):
    """Every grouped attention takes the form (no bias, unidirectional, the past tiled to all heads, the MHA's own
    present outputs kept), and the graph matches torch chunk after chunk, batch 2, also through a static session
    (one pinned past length per chunk, the first an empty past)."""
    monkeypatch.setenv(EXPERIMENT_ENV, "1")
    model = tiny_model(family, kind=kind, seed=2)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8, dtype=dtype)
    mha = _attentions(out)
    assert len(mha) == model.config.num_hidden_layers
    for n in mha:
        assert _attrs(n) == {"num_heads": model.config.num_attention_heads, "unidirectional": 1}
        assert len(n.input) == 8 and n.input[5] == "" and n.input[6] and n.input[7]  # no bias; past given
        assert len(n.output) == 3 and all(n.output)
    assert verify(out, against=model, chunks=4, batch=2).passed
    if kind == "inplace":
        assert verify(out, against=model, chunks=3, static=True).passed


def test_causal_form_needs_the_mask_it_claims(tmp_path, monkeypatch):
    """The same graph with unidirectional=0 (every new key visible to every query of the chunk) fails verify: the
    check sees the mask."""
    monkeypatch.setenv(EXPERIMENT_ENV, "1")
    model = tiny_model("llama", seed=3)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8)
    bad = str(tmp_path / "bad")
    shutil.copytree(out, bad)
    m = onnx.load(os.path.join(bad, "model.onnx"))
    for n in m.graph.node:
        if n.op_type == "MultiHeadAttention":
            for a in n.attribute:
                if a.name == "unidirectional":
                    a.i = 0
    onnx.save(m, os.path.join(bad, "model.onnx"))
    assert verify(out, against=model, chunks=2).passed
    with pytest.raises(Exception, match="(?i)logits|exceed|toleran"):
        verify(bad, against=model, chunks=2)


def test_window_exports_keep_the_masked_form(tmp_path, monkeypatch):
    """A window's mask is not causal over the whole past: the switch leaves window exports as they were."""
    monkeypatch.setenv(EXPERIMENT_ENV, "1")
    model = tiny_model("llama", window=12, seed=4)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8, attention="window", window=12)
    assert all("unidirectional" not in _attrs(n) and len(n.input) == 6 and n.input[5] for n in _attentions(out))
