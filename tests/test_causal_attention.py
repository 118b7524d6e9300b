"""Full-attention exports attend with ONNX's own ``Attention`` (opset 23; exporters/onnx/causal_attention.py) and
still equal the model over chained chunks: grouped and plain multi-head attention, q/k norms, FWL and in-place
models, chunks of one token and an empty past, batch > 1; window exports keep MultiHeadAttention."""
import os

import numpy as np
import onnx
import pytest
import torch

from exporters.onnx import causal_attention
from exporters.onnx.export import export_onnx
from exporters.runtime.session import ChunkSession
from exporters.verify import verify
from fwconvert.config import TOLERANCES
from test_onnx_common import step_in_pieces, tiny_model
from tiny import make_hf_model, rel_err

TOL = TOLERANCES["ort_fp32_vs_torch_fp32"].rel


def _base_model(heads, kv, **kw):
    from fwconvert.families import parse_config
    from fwconvert.modeling import build_model, load_tensors

    hf = make_hf_model("llama", hidden_size=48, num_attention_heads=heads, num_key_value_heads=kv, **kw)
    return load_tensors(build_model(parse_config(hf.config.to_dict(), "config")), hf.state_dict().items()).eval()


def _load(out):
    return onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)


def test_graph_form(tmp_path):
    """One Attention per layer reading the past cache and making present (no mask, no repeat-KV copy, no cache
    Concat, no transposes of the query or the new keys); opset 23 in the graph and the manifest."""
    model = _base_model(6, 2)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=5)
    m = _load(out)
    assert {(o.domain or "ai.onnx"): o.version for o in m.opset_import}["ai.onnx"] == causal_attention.OPSET
    ops = [(n.domain or "ai.onnx", n.op_type) for n in m.graph.node]
    layers = model.config.num_hidden_layers
    assert ops.count(("ai.onnx", "Attention")) == layers and ("com.microsoft", "MultiHeadAttention") not in ops
    assert not {"Expand", "Where", "Transpose", "Softmax"} & {op for _, op in ops}
    for i, n in enumerate(n for n in m.graph.node if n.op_type == "Attention"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert {k: attrs[k] for k in ("q_num_heads", "kv_num_heads", "is_causal", "softmax_precision")} == \
            {"q_num_heads": 6, "kv_num_heads": 2, "is_causal": 1, "softmax_precision": onnx.TensorProto.FLOAT}
        assert list(n.input[3:]) == ["", f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert list(n.output[1:]) == [f"present.{i}.key", f"present.{i}.value"]
        past = {f"past_key_values.{i}.key", f"past_key_values.{i}.value"}
        assert {k.op_type for k in m.graph.node if past & set(k.input)} <= {"Attention", "Shape"}
    onnx.checker.check_model(os.path.join(out, "model.onnx"), full_check=True)
    man = ChunkSession(out, provider="cpu").manifest
    assert man.versions["opset"] == causal_attention.OPSET and man.versions["ort_contrib_ops"]["ai.onnx.Attention"] == layers


@pytest.mark.parametrize("heads,kv", [(6, 2), (4, 4)])
def test_equals_the_model_over_any_chunking(tmp_path, heads, kv):
    """3 query heads per key/value head (SmolLM2's grouping) and plain multi-head attention (no repeat-KV in the
    traced graph): chunks of one token, an empty past, uneven chunks, batch 3."""
    model = _base_model(heads, kv)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8)
    s = ChunkSession(out, provider="cpu")
    ids = torch.randint(0, 256, (3, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).numpy()
    for pieces in ([1] * 23, [2, 1, 7, 1, 12], [8, 8, 7]):
        got, st = step_in_pieces(s, ids, pieces)
        assert rel_err(torch.from_numpy(got), torch.from_numpy(ref)) <= TOL
        assert st.position().tolist() == [23, 23, 23]
        assert st.to_numpy()["past_key_values.0.key"].shape == (3, kv, 23, 48 // heads)


@pytest.mark.parametrize("family,kind", [("qwen3", "fwl"), ("llama", "inplace"), ("qwen2", "base")])
def test_fast_weight_models_verify(tmp_path, family, kind):
    """Every state tensor and the logits over chained chunks (fp32): q/k norms (qwen3), a q bias (qwen2), FWL and
    in-place fast weights."""
    model = tiny_model(family, kind, seed=3)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8)
    assert sum(n.op_type == "Attention" for n in _load(out).graph.node) == model.config.num_hidden_layers
    rep = verify(out, against=model, chunks=5, batch=2)
    assert rep.passed and rep.worst().rel <= TOL, rep.worst()


def test_fp16_logits_within_the_fp16_tolerance(tmp_path):
    """fp16 graph on the CPU against torch in fp32, chained chunks: the logits stay within the fp16 tolerance (the
    CPU kernel rounds inside the op in fp16; the module doc)."""
    model = tiny_model("llama", "fwl", seed=5)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8, dtype="fp16")
    s = ChunkSession(out, provider="cpu")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    st = s.new_state(2)
    got = np.concatenate([s.step(ids[:, a:a + 8].numpy(), st) for a in range(0, 32, 8)], 1)
    with torch.no_grad():
        ref = model(ids).float()
    assert rel_err(torch.from_numpy(got.astype(np.float32)), ref) <= TOLERANCES["ort_fp16_vs_torch_fp32"].rel


def test_window_exports_keep_multihead_attention(tmp_path):
    """A window's mask is not the causal mask over the whole past: window exports (also every export of a model with
    a sliding window of its own, which export_onnx never exports with full attention) are left as they were."""
    model = tiny_model("llama", "base", window=16)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8, attention="window", window=16)
    m = _load(out)
    ops = [n.op_type for n in m.graph.node]
    assert "Attention" not in ops and ops.count("MultiHeadAttention") == model.config.num_hidden_layers
    assert {(o.domain or "ai.onnx"): o.version for o in m.opset_import}["ai.onnx"] == 18
