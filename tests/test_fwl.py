"""FWL head vs its slow reference: the six spec tests, conversion == base, export-ability, config errors.

The FWL parameters are non-trivial random values with large, distinct step sizes (0.3-0.9), on tiny models
of two families (llama: tied embeddings; qwen3: q/k norm, untied head).
"""
import dataclasses
import itertools
import math

import pytest
import torch

from fwconvert.config import TOLERANCES, FWLConfig
from fwconvert.errors import InputError
from fwconvert.families import parse_config
from fwconvert.fastweights.base import StepContext
from fwconvert.fastweights.fwl import FWLHead, init_conversion_
from fwconvert.fastweights.reference import fwl_logits_ref, fwl_params_ref, fwl_slow_logits_ref
from fwconvert.modeling import attach_fast_weights, build_model, load_tensors
from tiny import make_hf_model, rel_err

FAMILIES = ("llama", "qwen3")
STEP_SIZES = [0.3, 0.45, 0.6, 0.75, 0.9, 0.5]  # W1, b1, W2, b2, gamma, beta


def random_fwl_tensors(cfg, fw, seed):
    """Non-trivial random FWL parameters (checkpoint keys) with large, distinct step sizes."""
    g = torch.Generator().manual_seed(seed)
    d, h, s = cfg.hidden_size, fw.hidden, fw.size

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    return [("fwl_head.fc1.weight", rnd(h, d, std=d ** -0.5)), ("fwl_head.fc1.bias", rnd(h, std=0.5)),
            ("fwl_head.fc2.weight", rnd(s, h, std=h ** -0.5)), ("fwl_head.fc2.bias", rnd(s, std=0.5)),
            ("fwl_head.norm.weight", rnd(s, std=0.7)), ("fwl_head.norm.bias", rnd(s, std=0.5)),
            ("fwl_head.step_sizes", torch.tensor(STEP_SIZES))]


def fwl_model(family, seed=0, dtype=torch.float64, chunk=4, normalizer=1.0):
    hf = make_hf_model(family, seed=seed)
    cfg = parse_config(hf.config.to_dict(), "config")
    fw = FWLConfig(size=cfg.hidden_size, chunk_size=chunk, normalizer=normalizer)
    m = build_model(cfg, fw)
    tensors = itertools.chain(hf.state_dict().items(), random_fwl_tensors(cfg, fw, seed + 100))
    return load_tensors(m, tensors, dtype=dtype).eval()


def ids_for(b, t, seed=1):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def run_capturing(model, ids):
    """Model logits and the head's input x (final normed hidden states)."""
    seen = []
    hook = model.fwl_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        logits = model(ids)
    finally:
        hook.remove()
    return logits, seen[0]


def head_call(head, x, ids, U, chunk=None, aligned=False):
    if chunk is not None:
        head.fw = dataclasses.replace(head.fw, chunk_size=chunk)
    ctx = StepContext(input_ids=ids, position=torch.zeros(ids.shape[0], dtype=torch.int64), aligned=aligned)
    return head(x, head.init_state(ids.shape[0]), ctx, U)


def reference(model, x, ids, create_graph=False):
    head = model.fwl_head
    return fwl_logits_ref(fwl_params_ref(head), head.step_sizes, x, ids, model.unembed_weight,
                          head.fw.normalizer, head.fw.eps, create_graph=create_graph)


# 1. definition ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,normalizer", [("llama", 1.0), ("qwen3", 3.0)])
@torch.no_grad()
def test_definition_matches_explicit_sgd_step(family, normalizer):
    model = fwl_model(family, normalizer=normalizer, chunk=4)
    ids = ids_for(2, 11)  # 11 = 2 full chunks of 4 + a ragged one
    logits, x = run_capturing(model, ids)
    with torch.enable_grad():
        ref = reference(model, x, ids)
    assert rel_err(logits, ref) <= 1e-10
    # The step really moves the output (else the test would be weak).
    slow = fwl_slow_logits_ref(fwl_params_ref(model.fwl_head), x, model.unembed_weight, model.fwl_head.fw.eps)
    assert rel_err(slow[:, 1:], ref[:, 1:]) > 1e-2


@pytest.mark.parametrize("chunk", [4, None])
def test_state_sums_are_the_prefix_loss_gradients(chunk):
    """The state after one step from a fresh state holds autograd's gradients of the step's loss at the slow
    weights: sum_fc1 = [∂L/∂W1; ∂L/∂b1; 0...] (D + 1 rows, zero padding after), sum_fc2 likewise, sum_gamma /
    sum_beta = ∂L/∂γ, ∂L/∂β (the layout the linear attention reads as its prefix)."""
    from fwconvert.fastweights.fwl import padded
    from fwconvert.fastweights.fwl_reference import _prefix_loss

    model = fwl_model("llama", normalizer=3.0, chunk=4)
    ids = ids_for(2, 11)
    _, x = run_capturing(model, ids)
    head, U = model.fwl_head, model.unembed_weight
    with torch.no_grad():
        _, state = head_call(head, x, ids, U, chunk=chunk, aligned=chunk is None)
    d, h = head.fc1.in_features, head.fw.hidden
    assert state["sum_fc1"].shape == (2, padded(d), h) and state["sum_fc2"].shape == (2, padded(h), head.fw.size)
    for b in range(2):
        params = {k: v.detach().requires_grad_() for k, v in fwl_params_ref(head).items()}
        loss = _prefix_loss(params, x[b, :-1], ids[b, 1:], U, head.fw.normalizer, head.fw.eps)  # key 0: weight 0
        g = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        for name, w, bias, n in (("sum_fc1", "w1", "b1", d), ("sum_fc2", "w2", "b2", h)):
            st = state[name][b]
            assert rel_err(st[:n], g[w]) <= 1e-10 and rel_err(st[n], g[bias]) <= 1e-10, name
            assert bool((st[n + 1:] == 0).all()), name  # the padding rows stay exactly zero
        assert rel_err(state["sum_gamma"][b], g["gamma"]) <= 1e-10
        assert rel_err(state["sum_beta"][b], g["beta"]) <= 1e-10
        assert float(g["w1"].abs().max()) > 1e-6  # non-trivial gradients (else the test would be weak)


# 2. chunk invariance ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("t", [16, 13])
@torch.no_grad()
def test_chunk_invariance(family, t):
    model = fwl_model(family)
    ids = ids_for(2, t, seed=3)
    _, x = run_capturing(model, ids)
    head, U = model.fwl_head, model.unembed_weight
    base, base_state = head_call(head, x, ids, U, aligned=True)  # the whole step as one chunk
    for chunk in (1, 2, 3, 4, 5, 8, 16, 64):  # G = 16, 8, 4, 2, 1 for t = 16; ragged last chunks for 3, 5, 13
        out, state = head_call(head, x, ids, U, chunk=chunk)
        assert rel_err(out, base) <= 1e-12, chunk
        for k in base_state:
            assert rel_err(state[k], base_state[k]) <= 1e-12, (chunk, k)


# 3. position 0 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_position_zero_equals_slow_output(family):
    model = fwl_model(family)
    ids = ids_for(3, 6, seed=4)
    logits, x = run_capturing(model, ids)
    slow = fwl_slow_logits_ref(fwl_params_ref(model.fwl_head), x[:, 0], model.unembed_weight, model.fwl_head.fw.eps)
    assert rel_err(logits[:, 0], slow) <= 1e-12
    slow1 = fwl_slow_logits_ref(fwl_params_ref(model.fwl_head), x[:, 1], model.unembed_weight, model.fwl_head.fw.eps)
    assert rel_err(logits[:, 1], slow1) > 1e-3  # position 1 has moved


# 4. causality ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("aligned", [False, True])  # chunked (chunk 4, ragged) and the one-chunk export path
@torch.no_grad()
def test_causality(family, aligned):
    model = fwl_model(family, chunk=4)
    ids = ids_for(2, 14, seed=5)
    _, x = run_capturing(model, ids)
    head, U = model.fwl_head, model.unembed_weight
    out, _ = head_call(head, x, ids, U, aligned=aligned)
    g = torch.Generator().manual_seed(6)
    for t in (0, 3, 6, 12):
        x2, ids2 = x.clone(), ids.clone()
        x2[:, t + 1:] = torch.randn(x2[:, t + 1:].shape, generator=g, dtype=x.dtype)
        ids2[:, t + 1:] = (ids2[:, t + 1:] + 1 + torch.randint(0, 254, ids2[:, t + 1:].shape, generator=g)) % 256
        out2, _ = head_call(head, x2, ids2, U, aligned=aligned)
        assert (out2[:, :t + 1] - out[:, :t + 1]).abs().max() <= 1e-12 * out.abs().max(), t
        assert rel_err(out2[:, t + 1:], out[:, t + 1:]) > 1e-3, t  # the change is visible later
        # Changing only the label of position t (the input token t+1) is invisible up to t, seen at t+1.
        ids3 = ids.clone()
        ids3[:, t + 1] = (ids3[:, t + 1] + 17) % 256
        out3, _ = head_call(head, x, ids3, U, aligned=aligned)
        assert (out3[:, :t + 1] - out[:, :t + 1]).abs().max() <= 1e-12 * out.abs().max(), t
        assert rel_err(out3[:, t + 1], out[:, t + 1]) > 1e-6, t


# 5. meta-gradient ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_meta_gradient_matches_autograd_second_order(family):
    model = fwl_model(family, chunk=3)
    ids = ids_for(2, 8, seed=7)
    w = torch.randn(2, 8, 256, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    params = dict(model.named_parameters())
    logits, x = run_capturing(model, ids)
    ours = torch.autograd.grad((logits * w).sum(), list(params.values()), retain_graph=True)
    ref = reference(model, x, ids, create_graph=True)
    theirs = torch.autograd.grad((ref * w).sum(), list(params.values()))
    for name, a, b in zip(params, ours, theirs):
        assert rel_err(a, b) <= 1e-9, name
    step_grad = ours[list(params).index("fwl_head.step_sizes")]
    assert bool((step_grad.abs() > 1e-8).all())  # every step size receives a meta-gradient


# 6. streaming ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_streaming_equals_one_shot(family):
    model = fwl_model(family, dtype=torch.float32, chunk=8)
    ids = ids_for(2, 70, seed=9)
    full, full_state = model.step(ids, model.init_state(2))
    tol = TOLERANCES["stream_vs_oneshot_fp32"].rel
    for piece in (1, 7, 64):
        state, outs = model.init_state(2), []
        for a in range(0, 70, piece):
            logits, state = model.step(ids[:, a:a + piece], state)
            outs.append(logits)
        assert rel_err(torch.cat(outs, 1), full) <= tol, piece
        for k, v in full_state.items():
            if k.startswith("fast_weights.fwl."):
                assert state[k].dtype == torch.float32 and rel_err(state[k], v) <= tol, (piece, k)


# Conversion: converted == base, and calibration can move it --------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_equals_base_and_has_gradient(family):
    hf = make_hf_model(family, seed=11)
    cfg = parse_config(hf.config.to_dict(), "config")
    base = load_tensors(build_model(cfg), hf.state_dict().items()).eval()
    conv = load_tensors(build_model(cfg), hf.state_dict().items()).eval()
    attach_fast_weights(conv, FWLConfig(size=cfg.hidden_size, chunk_size=4))
    init_conversion_(conv.fwl_head, torch.Generator().manual_seed(0))
    ids = ids_for(2, 21, seed=12)
    with torch.no_grad():
        ref = base(ids)
    out = conv(ids)
    assert rel_err(out.detach(), ref) <= TOLERANCES["convert_vs_base_fp32"].rel
    assert torch.equal(out, ref)  # r is exactly 0 at conversion
    head = conv.fwl_head
    assert head.fc1.weight.abs().min() >= 0 and head.fc1.weight.std() > 0.01
    loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    loss.backward()
    assert head.norm.weight.grad.abs().sum() > 0 and head.norm.bias.grad.abs().sum() > 0
    assert bool((head.step_sizes.grad[4:].abs() > 0).all())  # η_γ, η_β move at conversion


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_converted_half_model_is_bit_identical_and_keeps_fp32_state(dtype):
    hf = make_hf_model("qwen3", seed=5)
    cfg = parse_config(hf.config.to_dict(), "config")
    base = load_tensors(build_model(cfg), hf.state_dict().items(), dtype=dtype)
    conv = load_tensors(build_model(cfg), hf.state_dict().items(), dtype=dtype)
    attach_fast_weights(conv, FWLConfig(size=cfg.hidden_size, chunk_size=4))
    init_conversion_(conv.fwl_head, torch.Generator().manual_seed(0)).to(dtype)
    ids = ids_for(2, 9, seed=15)
    logits, state = conv.step(ids, conv.init_state(2))
    assert logits.dtype == dtype and torch.equal(logits, base(ids))
    fw_state = {k: v for k, v in state.items() if k.startswith("fast_weights.fwl.")}
    assert len(fw_state) == 5 and all(v.dtype == torch.float32 for v in fw_state.values())
    assert all(bool(torch.isfinite(v).all()) for v in fw_state.values()) and fw_state["fast_weights.fwl.sum_beta"].abs().sum() > 0


def test_init_conversion_materialises_meta_head():
    hf = make_hf_model("llama", seed=2)
    cfg = parse_config(hf.config.to_dict(), "config")
    fw = FWLConfig(size=cfg.hidden_size)
    model = build_model(cfg, fw)  # all on meta
    head = init_conversion_(model.fwl_head, torch.Generator().manual_seed(0))
    assert not any(p.is_meta for p in head.parameters())
    assert sorted(k for k in model.state_dict() if k.startswith("fwl_head.")) == [
        "fwl_head.fc1.bias", "fwl_head.fc1.weight", "fwl_head.fc2.bias", "fwl_head.fc2.weight",
        "fwl_head.norm.bias", "fwl_head.norm.weight", "fwl_head.step_sizes"]
    tensors = itertools.chain(hf.state_dict().items(), ((k, v) for k, v in model.state_dict().items() if k.startswith("fwl_head.")))
    loaded = load_tensors(build_model(cfg, fw), tensors)
    shapes = loaded.fwl_head.state_shapes(3)
    state = loaded.init_state(3)
    _, new = loaded.step(ids_for(3, 5), state)
    for name, (shape, dtype) in shapes.items():
        assert new[f"fast_weights.fwl.{name}"].shape == shape and new[f"fast_weights.fwl.{name}"].dtype == dtype


# Config errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(size=0), "positive integer"), (dict(size=32), "must equal hidden_size"),
    (dict(chunk_size=0), "chunk_size"), (dict(normalizer=0.0), "normalizer"),
    (dict(normalizer=math.nan), "normalizer"), (dict(eps=-1.0), "eps"),
])
def test_bad_fwl_config_is_input_error(kw, msg):
    cfg = parse_config(make_hf_model("llama").config.to_dict(), "config")
    fw = FWLConfig(**{"size": cfg.hidden_size, **kw})
    with pytest.raises(InputError, match=msg):
        FWLHead(cfg, fw)


# Export-ability -----------------------------------------------------------------------------------------
class _StepWrapper(torch.nn.Module):
    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, input_ids, *state):
        logits, new = self.model.step(input_ids, dict(zip(self.names, state)), aligned=True)
        return (logits,) + tuple(new[k] for k in self.names)


@pytest.mark.slow  # ~20-30 s of torch.export tracing on a shared CPU
@torch.no_grad()
def test_model_step_exports_with_dynamic_batch_and_chunk():
    model = fwl_model("llama", dtype=torch.float32, chunk=8)
    _, state = model.step(ids_for(3, 5), model.init_state(3))  # P = 5, non-zero fast-weight state
    names = list(state)
    wrapper = _StepWrapper(model, names)
    B, T, P = torch.export.Dim("batch", min=1), torch.export.Dim("chunk", min=1, max=8), torch.export.Dim("past")
    dyn = {"input_ids": {0: B, 1: T},
           "state": tuple({0: B, 2: P} if k.startswith("past_key_values") else {0: B} for k in names)}
    ep = torch.export.export(wrapper, (ids_for(3, 4, seed=13), *state.values()), dynamic_shapes=dyn)
    fresh = model.init_state(2)  # P = 0, position 0: nothing pending
    for b, t, st in ((3, 4, state), (2, 7, state), (2, 1, state), (2, 4, fresh)):
        args = (ids_for(b, t, seed=14), *(st[k][:b] for k in names))
        for a, w in zip(ep.module()(*args), wrapper(*args)):
            assert rel_err(a, w) <= 1e-5
