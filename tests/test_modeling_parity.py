"""Our decoder vs transformers' own model classes (fp32), and streaming vs one-shot."""
import pytest
import torch

from fwconvert.config import TOLERANCES
from fwconvert.families import parse_config
from fwconvert.modeling import build_model, load_tensors
from tiny import make_hf_model, rel_err

TOL = TOLERANCES["torch_fp32_vs_transformers"].rel


def _ours(hf):
    m = build_model(parse_config(hf.config.to_dict(), "config"))
    return load_tensors(m, hf.state_dict().items()).eval()


@torch.no_grad()
def test_logits_match_transformers(family):
    hf = make_hf_model(family)
    m = _ours(hf)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(1))
    assert rel_err(m(ids), hf(ids).logits) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("piece", [1, 5, 64])
def test_streaming_equals_one_shot(family, piece):
    hf = make_hf_model(family)
    m = _ours(hf)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(2))
    full = m(ids)
    state, outs = m.init_state(2), []
    for a in range(0, ids.shape[1], piece):
        logits, state = m.step(ids[:, a:a + piece], state)
        outs.append(logits)
    assert rel_err(torch.cat(outs, 1), full) <= TOL
    assert int(state["position"][0]) == 70


@torch.no_grad()
def test_window_state_is_bounded_and_matches_transformers():
    hf = make_hf_model("mistral", sliding_window=8)
    m = _ours(hf)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    ref = hf(ids).logits
    state, outs = m.init_state(1), []
    for a in range(0, 40, 3):
        logits, state = m.step(ids[:, a:a + 3], state)
        outs.append(logits)
        assert state["past_key_values.0.key"].shape[2] <= 8  # W slots (W - 1 reachable + 1 for alignment)
    assert rel_err(torch.cat(outs, 1), ref) <= TOL


def test_step_does_not_mutate_state():
    hf = make_hf_model("llama")
    m = _ours(hf)
    state = m.init_state(1)
    _, s1 = m.step(torch.tensor([[1, 2, 3]]), state)
    before = {k: v.clone() for k, v in s1.items()}
    m.step(torch.tensor([[4]]), s1)
    assert all(torch.equal(before[k], s1[k]) for k in before)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["base", "fwl", "inplace"])
def test_step_refuses_an_empty_chunk(kind):
    """A chunk of zero tokens (or ids that are not [B, C]) is a clear ValueError for every model kind (FWL's
    chunked update divided by the chunk length before)."""
    from test_onnx_common import tiny_model

    m = tiny_model("llama", kind)
    for ids in (torch.zeros(1, 0, dtype=torch.long), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="at least one token"):
            m.step(ids, m.init_state(1))


def test_half_keeps_rotary_frequencies_fp32():
    """An fp16 cast must not round inv_freq (it moved rope angles by radians at position 8k)."""
    from fwconvert.modeling.rope import inverse_frequencies

    m = _ours(make_hf_model("llama")).half()
    assert m.inv_freq.dtype == torch.float32
    assert torch.equal(m.inv_freq, inverse_frequencies(m.config))


def test_one_shot_attends_causally_without_a_mask(monkeypatch):
    """forward() (calibration's loss) gives SDPA ``is_causal`` instead of a [B, 1, T, T] mask, so CUDA can run its
    flash kernel; values and gradients equal the masked path's (float64). A window model keeps the mask."""
    import fwconvert.modeling.decoder as dec

    m = _ours(make_hf_model("llama")).double()
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(4))

    def loss_and_grads(fn):
        m.zero_grad()
        out = fn()
        (out.square().mean()).backward()
        return out.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    masked, g_masked = loss_and_grads(lambda: m._step(ids, m.init_state(2, dtype=torch.float64), False, causal=False)[0])
    built = []
    real = dec.attention_mask
    monkeypatch.setattr(dec, "attention_mask", lambda *a: built.append(1) or real(*a))
    causal, g_causal = loss_and_grads(lambda: m(ids))
    assert not built, "forward() without a window must not build an attention mask"
    assert rel_err(causal, masked) <= 1e-12
    assert len(g_causal) == len(g_masked) and all(rel_err(a, b) <= 1e-12 for a, b in zip(g_causal, g_masked))

    w = _ours(make_hf_model("mistral", sliding_window=8))
    with torch.no_grad():
        w(ids)
    assert built, "a window model's forward() needs its mask"


def test_attention_without_mask_refuses_a_past():
    m = _ours(make_hf_model("llama"))
    attn, cfg = m.model.layers[0].self_attn, m.config
    x = torch.randn(1, 3, cfg.hidden_size)
    from fwconvert.modeling.rope import rope_cos_sin

    cos, sin = rope_cos_sin(m.inv_freq, torch.arange(3)[None], x.dtype)
    past = torch.zeros(1, cfg.num_key_value_heads, 2, cfg.head_dim)
    with pytest.raises(ValueError, match="no past"):
        attn(x, cos, sin, past, past, None)
