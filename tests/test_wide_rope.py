"""The interleaved head layout with wide RoPE heads (exporters/onnx/rotary_form.py, every export since session 17):
the same rotation in another dim order (float64), exports that verify with the keys in the manifest's order (and
fail without it), the op-head grouping, and the manifest's check of the order. The export form against the module
form: tests/test_onnx_export.py::test_export_form_computes_what_the_model_computes."""
import json
import os
import shutil

import onnx
import pytest
import torch

from exporters.onnx.export import export_onnx
from exporters.onnx.rotary_form import group_size
from exporters.runtime.session import ChunkSession
from exporters.verify import verify
from fwconvert.errors import InputError, NumericError
from fwconvert.modeling.rope import (_rotate_half, apply_rope, interleaved_order, interleaved_rotation_matrix,
                                     rope_cos_sin)
from test_onnx_common import tiny_model


def test_interleaved_rope_is_the_same_rotation_reordered():
    """apply_rope in the interleaved layout (x, cos, sin reordered; the interleaved rotation) is the half-split RoPE
    reordered, exactly; the order puts each rotated pair (p, p + hd/2) at (2p, 2p + 1)."""
    hd = 12
    order = interleaved_order(hd)
    assert order.tolist() == [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, hd, generator=g, dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    cos, sin = rope_cos_sin(inv, torch.arange(10, 15).repeat(2, 1), torch.float64)
    want = apply_rope(x, cos, sin)
    got = apply_rope(x[..., order], cos[..., order], sin[..., order], interleaved_rotation_matrix(hd, torch.float64))
    assert torch.equal(got, want[..., order])
    assert torch.equal(want, x * cos[:, :, None] + _rotate_half(x) * sin[:, :, None])
    assert not torch.equal(x @ interleaved_rotation_matrix(hd, torch.float64), _rotate_half(x))


def test_group_size():
    """Heads per op head: the largest divisor of the head count within onnxruntime's 1024 threads per block."""
    assert group_size(12, 64) == 12  # SmolLM2's q and k: one op head of 768
    assert group_size(40, 64) == 10  # the LLaMA-1B shape's q and k: 4 op heads of 640
    assert group_size(32, 128) == 8
    assert group_size(7, 200) == 1


def _ropes(out):
    g = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    return [n for n in g.graph.node if n.op_type == "RotaryEmbedding"], [n.op_type for n in g.graph.node]


@pytest.mark.parametrize("family,kind,window,sinks", [("llama", "fwl", None, 0), ("qwen3", "inplace", 12, 2)])
def test_export_verifies_with_the_keys_in_the_manifest_order(family, kind, window, sinks, tmp_path):
    """Every RoPE is one interleaved RotaryEmbedding whose op heads hold several heads (angle rows tiled), the
    manifest records the key order, and verify passes over 4 chunks at batch 2 (keys, sink keys and fast-weight
    state compared). Without the manifest's order (None: what exports before session 17 recorded, the model's own
    order) the same keys fail: they really are reordered."""
    model = tiny_model(family, kind, window=window)
    model.sinks = sinks
    kw = {"attention": "window", "window": window} if window else {}
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8, **kw)
    ropes, ops = _ropes(out)
    assert len(ropes) == 2 * model.config.num_hidden_layers  # q and k apart
    assert all(a.i == 1 for n in ropes for a in n.attribute if a.name == "interleaved")
    assert ops.count("Tile") == 4  # cos and sin rows, once per step for each op-head width (q's and k's)
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["key_dim_order"] == interleaved_order(model.config.head_dim).tolist()
    rep = verify(out, against=model, chunks=4, batch=2)
    assert rep.passed and {r.name for r in rep.rows} >= {"past_key_values.0.key", "logits"}
    if sinks:
        assert "past_key_values.0.sink_key" in {r.name for r in rep.rows}
    man["key_dim_order"] = None
    plain = str(tmp_path / "plain")
    shutil.copytree(out, plain)
    with open(os.path.join(plain, "manifest.json"), "w") as f:
        json.dump(man, f)
    with pytest.raises(NumericError, match="key"):
        verify(plain, against=model, chunks=2, batch=2)


@pytest.mark.parametrize("bad", [[0, 1], list(range(15)) + [0], "0,1", [True] * 16])
def test_manifest_key_order_must_order_the_head_dims(bad, tmp_path):
    """A session refuses a key_dim_order that is not an order of the graph's head dims (llama tiny: 16)."""
    out = export_onnx(tiny_model("llama"), str(tmp_path / "onnx"), chunk_size=4)
    path = os.path.join(out, "manifest.json")
    man = json.load(open(path))
    man["key_dim_order"] = bad
    with open(path, "w") as f:
        json.dump(man, f)
    with pytest.raises(InputError, match="key_dim_order must be an order of the 16 head dims"):
        ChunkSession(out, provider="cpu")


def test_export_with_several_op_heads_per_rope(tmp_path):
    """20 query heads of 64 (1,280 > 1,024 threads) are two op heads of 10 heads each (their angle rows tiled 10
    times), the 4 key heads one op head of 4 (tiled 4 times), and the export still verifies (float32, 3 chunks,
    batch 2)."""
    from fwconvert.families import parse_config
    from fwconvert.modeling import build_model, load_tensors
    from tiny import make_hf_model

    hf = make_hf_model("llama", num_hidden_layers=1, hidden_size=80, num_attention_heads=20, num_key_value_heads=4,
                       head_dim=64)
    model = load_tensors(build_model(parse_config(hf.config.to_dict(), "config")), hf.state_dict().items()).eval()
    assert group_size(20, 64) == 10 and group_size(4, 64) == 4
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=4)
    g = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    tiles = [n for n in g.graph.node if n.op_type == "Tile"]
    reps = [onnx.numpy_helper.to_array(i).tolist() for i in g.graph.initializer if i.name in {n.input[1] for n in tiles}]
    reps += [onnx.numpy_helper.to_array(n.attribute[0].t).tolist() for n in g.graph.node
             if n.op_type == "Constant" and n.output[0] in {t.input[1] for t in tiles}]
    assert len(tiles) == 4 and sorted(reps) == [[1, 4], [1, 4], [1, 10], [1, 10]], reps
    assert verify(out, against=model, chunks=3, batch=2).passed
