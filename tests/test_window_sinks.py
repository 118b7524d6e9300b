"""Attention sinks with a window (``sinks=S``): the document's first S tokens stay attendable beyond the window.

Checked against a slow definition: the same weights with full attention over the whole past and an explicit mask
(key j attendable by query i iff j <= i and (i - j < W or j < S)), streamed in chunks of any length, with the
growing and the fixed-size window state; S = 0 is the plain window model."""
import pytest
import torch

import fwconvert.modeling.decoder as dec
from test_onnx_common import tiny_model

W, S = 6, 2


def _reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """One pass with full attention and the sink rule as an explicit mask (no window state at all)."""
    full = tiny_model("llama", seed=11)
    full.load_state_dict(model.state_dict())
    plain_mask = dec.attention_mask

    def mask(position, t, p, window):
        q = position[:, None] + torch.arange(t)[None, :]
        k = position[:, None] - p + torch.arange(p + t)[None, :]
        diff = q[:, :, None] - k[:, None, :]
        return ((diff >= 0) & (k[:, None, :] >= 0) & ((diff < W) | (k[:, None, :] < S)))[:, None]

    dec.attention_mask = mask
    try:
        with torch.no_grad():
            return full.step(ids, full.init_state(ids.shape[0]))[0]
    finally:
        dec.attention_mask = plain_mask


@pytest.mark.parametrize("fixed", [False, True])
def test_sinks_equal_the_explicit_mask_in_any_chunking(fixed):
    model = tiny_model("llama", seed=11, window=W)
    model.sinks = S
    ids = torch.randint(0, model.config.vocab_size, (2, 31), generator=torch.Generator().manual_seed(3))
    want = _reference_logits(model, ids)
    st, a, got = model.init_state(2, fixed_window=fixed), 0, []
    with torch.no_grad():
        for n in [1, 3, 5, 1, 2, 7, 4, 8]:
            lo, st = model.step(ids[:, a:a + n], st)
            got.append(lo)
            a += n
    assert a == 31
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5)
    assert st["past_key_values.0.sink_key"].shape == (2, model.config.num_key_value_heads, S, model.config.head_dim)
    # without sinks the same stream is the plain window model, which differs once token 0 leaves the window
    model.sinks = 0
    with torch.no_grad():
        plain = model.step(ids, model.init_state(2))[0]
    assert not torch.allclose(plain[:, W:], want[:, W:], atol=1e-4)
    torch.testing.assert_close(plain[:, :W], want[:, :W], rtol=1e-5, atol=1e-5)


def test_sinks_need_a_window():
    model = tiny_model("llama", seed=11)
    model.sinks = 2
    with pytest.raises(ValueError, match="need a window"):
        model.init_state(1)


@pytest.mark.parametrize("kind,dtype", [("fwl", "fp32"), ("inplace", "fp16")])  # fast-weight state beside the sinks
def test_window_export_with_sinks_verifies(tmp_path, kind, dtype):
    """A window export with sinks (their own fixed-size state) equals the torch sink model over 8 chunks of 8 tokens
    through a window of 23, in ordinary and static sessions; the manifest records the sinks, and verify refuses a
    reference model without them."""
    from exporters.onnx.export import export_onnx
    from exporters.runtime.session import ChunkSession
    from exporters.verify import verify
    from fwconvert.errors import InputError

    model = tiny_model("llama", kind, seed=5, window=23)
    model.sinks = 4
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8, dtype=dtype, attention="window", window=23)
    s = ChunkSession(out, provider="cpu")
    assert s.manifest.sink_tokens == 4
    assert s.manifest.state[1].key.startswith("past_key_values.")
    sink = next(x for x in s.manifest.state if x.key == "past_key_values.0.sink_key")
    assert sink.shape == ["batch", model.config.num_key_value_heads, 4, model.config.head_dim]
    for static in (False, True):
        rep = verify(out, against=model, chunks=8, batch=2, static=static)
        assert rep.passed, rep.worst()
    model.sinks = 0
    with pytest.raises(InputError, match="4 attention sinks"):
        verify(out, against=model, chunks=1)


def test_sinks_need_a_window_export(tmp_path, capsys):
    from fwconvert.cli.main import main

    model_dir = tmp_path / "m"
    from tiny import make_hf_model, save_checkpoint

    src = save_checkpoint(make_hf_model("llama", seed=1), str(model_dir))
    with pytest.raises(SystemExit) as e:
        main(["export-onnx", src, "-o", str(tmp_path / "o"), "--sink-tokens", "4"])
    assert e.value.code == 2 and "needs --attention window" in capsys.readouterr().err  # a usage error
    with pytest.raises(SystemExit) as e:
        main(["export-onnx", src, "-o", str(tmp_path / "o"), "--attention", "window", "--window", "8",
              "--sink-tokens", "-1"])
    assert e.value.code == 2  # usage: click's range check


def test_window_export_of_a_checkpoint_keeps_4_sinks_by_default(tmp_path, capsys):
    """A window the model was not trained with gets export_onnx.DEFAULT_SINKS sinks unless told otherwise; a model's
    own sliding window (mistral) and a given DecoderLM keep theirs (0 here); full attention has none."""
    import fwconvert
    from exporters.onnx.export import DEFAULT_SINKS, _resolve_sinks
    from exporters.runtime.session import load_manifest
    from fwconvert.cli.main import main
    from tiny import make_hf_model, save_checkpoint

    src = save_checkpoint(make_hf_model("llama", seed=1), str(tmp_path / "m"))
    with pytest.raises(SystemExit) as e:
        main(["export-onnx", src, "-o", str(tmp_path / "o"), "--attention", "window", "--window", "8",
              "--chunk-size", "4"])
    assert e.value.code == 0 and "first 4 tokens stay attendable" in capsys.readouterr().err  # said, not silent
    assert DEFAULT_SINKS == 4 and load_manifest(str(tmp_path / "o")).sink_tokens == DEFAULT_SINKS
    llama = fwconvert.load(src)
    assert _resolve_sinks(llama, src, "window", 0) == 0  # --sink-tokens 0: the plain window model
    assert _resolve_sinks(llama, src, "full", None) == 0
    assert _resolve_sinks(llama, None, "window", None) == 0  # a given DecoderLM as it is
    mistral = save_checkpoint(make_hf_model("mistral", seed=1), str(tmp_path / "mi"))
    assert _resolve_sinks(fwconvert.load(mistral), mistral, "window", None) == 0  # its own sliding window
