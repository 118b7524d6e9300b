"""In-place TTT (fastweights/inplace_ttt.py) against its references: the spec's five tests and more.

1 three forms agree, 2 zero conv == base, 3 chunk causality + live fast weights, 4 streaming == one-shot
and reset, 5 one chunk by hand; plus aligned (export) path, input_embed target, gradients, layer specs.
Tiny models (hidden 64, 2 layers, vocab 256), chunk 8, every TTT parameter random, large eta.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from fwconvert.config import TOLERANCES, InPlaceTTTConfig
from fwconvert.errors import InputError
from fwconvert.families import parse_config
from fwconvert.fastweights.base import StepContext
from fwconvert.fastweights.inplace_ttt import (InPlaceTTTMLP, check_ttt_config, init_conversion_, parse_layer_spec,
                                               state_floats_per_sequence)
from fwconvert.fastweights.reference import inplace_ttt_dual_ref, inplace_ttt_sequential_ref
from fwconvert.modeling import build_model, load_tensors
from tiny import make_hf_model, rel_err

C = 8  # chunk size
LR = 0.5
TOL = TOLERANCES["stream_vs_oneshot_fp32"].rel
TWO_FAMILIES = ("llama", "qwen3")


def _ttt_tensors(cfg, fw, seed):
    g = torch.Generator().manual_seed(seed)
    d = cfg.hidden_size
    for i in fw.layers:
        yield f"model.layers.{i}.mlp.ttt_conv.weight", 0.3 * torch.randn(d, 1, fw.conv_kernel, generator=g)
        yield f"model.layers.{i}.mlp.ttt_proj.weight", 0.1 * torch.randn(d, d, generator=g)


def _models(family="llama", seed=0, **fw_kw):
    """(base DecoderLM, TTT DecoderLM on layers 0 and 1 with random conv/proj, fw config)."""
    hf = make_hf_model(family, seed=seed)
    cfg = parse_config(hf.config.to_dict(), "config")
    fw = InPlaceTTTConfig(layers=(0, 1), chunk_size=C, lr=fw_kw.pop("lr", LR), **fw_kw)
    base = load_tensors(build_model(cfg), hf.state_dict().items()).eval()
    items = list(hf.state_dict().items()) + list(_ttt_tensors(cfg, fw, seed + 100))
    return base, load_tensors(build_model(cfg, fw), items).eval(), fw


def _ids(b, t, seed=1):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def _ctx(x, position=0, aligned=False, embeddings=None):
    b, t, _ = x.shape
    pos = torch.full((b,), position, dtype=torch.int64) if isinstance(position, int) else position
    return StepContext(input_ids=torch.zeros(b, t, dtype=torch.int64), position=pos, embeddings=embeddings, aligned=aligned)


def _mlp(target="hidden_states", dtype=torch.float64, seed=0, lr=LR):
    model = _models(lr=lr, target=target, seed=seed)[1]
    return model.model.layers[0].mlp.to(dtype), model.config


def _ref_args(m):
    return (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, m.ttt_conv.weight, m.ttt_proj.weight, m.lr,
            m.chunk_size)


class RefMLP(torch.nn.Module):
    """Stands in for an InPlaceTTTMLP inside the decoder, computing a whole sequence with a reference."""

    stateful = True

    def __init__(self, mlp, ref):
        super().__init__()
        self.mlp, self.ref = mlp, ref

    def init_state(self, batch_size, device=None):
        return {}

    def forward(self, x, state, ctx):
        assert int(ctx.position.max()) == 0, "references run whole sequences only"
        t = x if self.mlp.target == "hidden_states" else ctx.embeddings
        out = self.ref(x, t, *_ref_args(self.mlp))
        return (out[0] if isinstance(out, tuple) else out), {}


# -- 1. the three forms agree ------------------------------------------------------------------
@pytest.mark.parametrize("target", ["hidden_states", "input_embed"])
@torch.no_grad()
def test_three_forms_agree_mlp_level(target):
    m, _ = _mlp(target)
    x = torch.randn(3, 4 * C + 5, 64, dtype=torch.float64)
    t = x if target == "hidden_states" else torch.randn_like(x)
    delta0 = 0.05 * torch.randn(3, 64, m.intermediate_size, dtype=torch.float64)
    for d0 in (None, delta0):  # from a fresh and from a non-zero initial state
        state = m.init_state(3)
        if d0 is not None:
            state["delta"] = d0
        out, new = m(x, state, _ctx(x, embeddings=t))
        seq, seq_delta = inplace_ttt_sequential_ref(x, t, *_ref_args(m), delta0=d0)
        dual = inplace_ttt_dual_ref(x, t, *_ref_args(m), delta0=d0)
        assert rel_err(out, seq) < 1e-12 and rel_err(out, dual) < 1e-12
        assert rel_err(new["delta"], seq_delta) < 1e-12
        assert torch.equal(new["pending_x"], x[:, 4 * C:])
    fast = out - m.down_proj(m.hidden(x))  # the fast weights contribute substantially
    assert fast[:, C:].norm() > 0.5 * out[:, C:].norm()


@pytest.mark.parametrize("family", TWO_FAMILIES)
@pytest.mark.parametrize("target", ["hidden_states", "input_embed"])
@torch.no_grad()
def test_three_forms_agree_whole_model(family, target):
    base, model, fw = _models(family, target=target)
    ids = _ids(2, 4 * C + 3)
    ours = model(ids)
    mlps = {i: model.model.layers[i].mlp for i in fw.layers}
    for ref in (inplace_ttt_sequential_ref, inplace_ttt_dual_ref):
        for i, mlp in mlps.items():
            model.model.layers[i].mlp = RefMLP(mlp, ref)
        assert rel_err(ours, model(ids)) <= TOL, ref.__name__
    assert rel_err(ours, base(ids)) > 1e-2  # and TTT is far from the base model


def test_parallel_form_gradients_match_sequential_reference():
    m, _ = _mlp("hidden_states")
    x = torch.randn(2, 3 * C + 3, 64, dtype=torch.float64, requires_grad=True)
    state = m.init_state(2)
    state["delta"] = (0.05 * torch.randn(2, 64, m.intermediate_size, dtype=torch.float64)).requires_grad_()
    w = torch.randn(2, 3 * C + 3, 64, dtype=torch.float64)
    wd = torch.randn(2, 64, m.intermediate_size, dtype=torch.float64)
    params = [x, state["delta"], *m.parameters()]

    def grads(fn):
        out, delta = fn()
        return torch.autograd.grad((out * w).sum() + (delta * wd).sum(), params)

    ours = grads(lambda: (lambda o, s: (o, s["delta"]))(*m(x, state, _ctx(x))))
    ref = grads(lambda: inplace_ttt_sequential_ref(x, x, *_ref_args(m), delta0=state["delta"]))
    names = ["x", "delta0"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, ours, ref):
        assert rel_err(a, b) < 1e-10, name


# -- 2. zero conv => identical to the base model -----------------------------------------------
@torch.no_grad()
def test_zero_conv_equals_base(family):
    base, model, fw = _models(family)
    g = torch.Generator().manual_seed(5)
    for i in fw.layers:
        mlp = model.model.layers[i].mlp
        before = {k: v.clone() for k, v in mlp.state_dict().items()}
        init_conversion_(mlp, g)
        after = mlp.state_dict()
        assert torch.count_nonzero(after["ttt_conv.weight"]) == 0
        p = after["ttt_proj.weight"]
        assert torch.equal(p, torch.diag(torch.diagonal(p))) and 0 < p.diagonal().std() < 0.05
        assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("ttt_"))
    ids = _ids(2, 5 * C + 1)
    assert torch.equal(model(ids), base(ids))
    out, state = _stream(model, ids, 3)  # streaming too, and the delta stays exactly zero
    assert torch.equal(out, _stream(base, ids, 3)[0])
    assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if k.endswith(".delta"))


@torch.no_grad()
def test_from_mlp_wraps_a_loaded_mlp_and_equals_base():
    base, model, fw = _models("qwen2")
    for i in fw.layers:
        model.model.layers[i].mlp = InPlaceTTTMLP.from_mlp(base.model.layers[i].mlp, model.config, fw)
    ids = _ids(1, 3 * C)
    assert torch.equal(model(ids), base(ids))
    assert model.model.layers[0].mlp.down_proj is base.model.layers[0].mlp.down_proj


# -- 3. chunk-level causality; the fast weights are live ---------------------------------------
@pytest.mark.parametrize("family", TWO_FAMILIES)
@torch.no_grad()
def test_causality_and_live_fast_weights_model(family):
    base, model, _ = _models(family)
    ids = _ids(1, 4 * C)
    ref = model(ids)
    for p in (C - 1, C, 2 * C + 3):  # changing token p (chunk >= i+1) leaves everything before p alone
        other = ids.clone()
        other[0, p] = (other[0, p] + 1) % 256
        out = model(other)
        assert torch.equal(out[:, :p], ref[:, :p])
        assert not torch.allclose(out[:, p], ref[:, p])
    b = base(ids)  # chunk 0 runs on W0; from chunk 1 on the updated W is live
    assert rel_err(ref[:, :C], b[:, :C]) <= TOL
    assert all(rel_err(ref[:, k * C:(k + 1) * C], b[:, k * C:(k + 1) * C]) > 1e-2 for k in (1, 2, 3))


def test_causality_and_live_fast_weights_mlp_level():
    m, _ = _mlp()
    x = torch.randn(1, 4 * C, 64, dtype=torch.float64)
    ref, _ = m(x, m.init_state(1), _ctx(x))
    for i in range(3):
        y = x.clone()
        y[0, i * C + 2] += 1.0  # one token of chunk i
        out, _ = m(y, m.init_state(1), _ctx(y))
        change = (out - ref).abs().amax(-1)[0]  # [L]
        same = torch.ones(4 * C, dtype=torch.bool)
        same[i * C + 2] = False
        same[(i + 1) * C:] = False
        assert torch.all(change[same] == 0), f"chunk {i}: change outside the token and later chunks"
        assert torch.all(change[(i + 1) * C:] > 1e-6), f"chunk {i}: later chunks did not see the update"


# -- 4. streaming in pieces == one-shot; document reset ----------------------------------------
def _stream(model, ids, piece, state=None, aligned=False):
    state = model.init_state(ids.shape[0]) if state is None else state
    outs = []
    for a in range(0, ids.shape[1], piece):
        logits, state = model.step(ids[:, a:a + piece], state, aligned=aligned)
        outs.append(logits)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("family", TWO_FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("piece", [1, 3, C - 1, C, C + 1, 2 * C + 5])
@torch.no_grad()
def test_streaming_equals_one_shot(family, batch, piece):
    _, model, fw = _models(family)
    ids = _ids(batch, 4 * C + 5, seed=batch)  # different documents in one batch
    full, final = model.step(ids, model.init_state(batch))
    out, state = _stream(model, ids, piece)
    assert rel_err(out, full) <= TOL
    for i in fw.layers:
        k = f"fast_weights.layers.{i}.mlp."
        assert rel_err(state[k + "delta"], final[k + "delta"]) <= TOL
        assert state[k + "delta"].dtype == torch.float32
        assert rel_err(state[k + "pending_x"], final[k + "pending_x"]) <= TOL and state[k + "pending_x"].shape[1] == 5
    for b in range(batch):  # each document alone gives its own row
        assert rel_err(out[b], model(ids[b:b + 1])[0]) <= TOL


@torch.no_grad()
def test_streaming_irregular_pieces_input_embed_target():
    _, model, _ = _models("mistral", target="input_embed")
    ids = _ids(2, 5 * C + 2)
    full = model(ids)
    state, outs, a = model.init_state(2), [], 0
    for piece in (2, 9, 1, 7, 5, 16, 2):
        logits, state = model.step(ids[:, a:a + piece], state)
        outs.append(logits)
        a += piece
    assert a == ids.shape[1] and rel_err(torch.cat(outs, 1), full) <= TOL
    assert state["fast_weights.layers.0.mlp.pending_t"].shape == (2, 2, 64)


@torch.no_grad()
def test_document_reset_restores_w0():
    base, model, _ = _models("llama")
    doc_a, doc_b = _ids(2, 3 * C + 2, seed=7), _ids(2, 2 * C + 3, seed=8)
    _, state = _stream(model, doc_a, 5)
    assert state["fast_weights.layers.0.mlp.delta"].abs().max() > 0
    fresh = model.init_state(2)  # a new document = a fresh state
    assert all(torch.count_nonzero(v) == 0 for k, v in fresh.items() if k.endswith(".delta"))
    out, _ = _stream(model, doc_b, 3, fresh)
    assert rel_err(out, model(doc_b)) <= TOL
    assert rel_err(out[:, :C], base(doc_b)[:, :C]) <= TOL  # chunk 0 of the new document sees W0 again


# -- 5. one chunk by hand -----------------------------------------------------------------------
def test_one_chunk_by_hand():
    m, _ = _mlp(dtype=torch.float32)
    x = torch.randn(2, 2 * C - 3, 64)  # one full chunk, then a ragged one (no update from it)
    out, new = m(x, m.init_state(2), _ctx(x))
    w0, wg, wu = m.down_proj.weight, m.gate_proj.weight, m.up_proj.weight
    x0, x1 = x[:, :C], x[:, C:]
    z0 = F.silu(x0 @ wg.T) * (x0 @ wu.T)  # [B, C, F]
    z1 = F.silu(x1 @ wg.T) * (x1 @ wu.T)
    padded = F.pad(x0, (0, 0, 2, 2))  # the chunk zero-padded at both ends: [B, C+4, D]
    k = m.ttt_conv.weight[:, 0]  # [D, 5]
    conv = sum(padded[:, j:j + C] * k[:, j] for j in range(5))  # [B, C, D]
    v0 = conv @ m.ttt_proj.weight
    with torch.no_grad():
        for b in range(2):
            dw = v0[b].T @ z0[b]  # [D, F]
            assert rel_err(out[b, :C], F.linear(z0[b], w0)) <= TOL
            assert rel_err(out[b, C:], F.linear(z1[b], w0 + m.lr * dw)) <= TOL
            assert rel_err(new["delta"][b], m.lr * dw) <= TOL
            assert rel_err(out[b, C:], F.linear(z1[b], w0)) > 1e-2


# -- the aligned (export) path ------------------------------------------------------------------
@pytest.mark.parametrize("target", ["hidden_states", "input_embed"])
@torch.no_grad()
def test_aligned_path_equals_general_path_mlp(target):
    m, _ = _mlp(target)
    x = torch.randn(2, 3 * C + 5, 64, dtype=torch.float64)
    t = torch.randn_like(x) if target == "input_embed" else None
    general, g_state = m(x, m.init_state(2), _ctx(x, embeddings=t))
    state, outs = m.init_state(2, aligned=True), []
    assert set(state) == {"delta"}
    for a in range(0, x.shape[1], C):
        xs = x[:, a:a + C]
        out, state = m(xs, state, _ctx(xs, a, aligned=True, embeddings=None if t is None else t[:, a:a + C]))
        assert set(state) == {"delta"}
        outs.append(out)
    assert rel_err(torch.cat(outs, 1), general) < 1e-12
    assert rel_err(state["delta"], g_state["delta"]) < 1e-12  # the short last step gave no update



def _tf32(t):
    """``t`` in fp32 rounded to TF32 (10 mantissa bits, to nearest): how onnxruntime's CUDA provider rounds the inputs
    of the fp32 GEMMs in an fp16 graph (TF32 on)."""
    i = t.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def _tf32_aligned_step(m, x, delta):
    """The aligned step of an fp16 model with every fast-weight product in fp32 on TF32-rounded inputs: what the fp16
    graphs computed on the GPU before their products became fp16 (session 10). A full chunk from position 0."""
    z = m.hidden(x)
    out = m.down_proj(z) + (_tf32(z) @ _tf32(delta).transpose(1, 2)).to(z.dtype)
    w = m.ttt_conv.weight.float()
    v = F.conv1d(_tf32(x).transpose(1, 2), _tf32(w), padding=w.shape[-1] // 2, groups=w.shape[0]).transpose(1, 2)
    v = _tf32(v) @ _tf32(m.ttt_proj.weight.float())
    return out, delta + m.lr * (_tf32(v).transpose(1, 2) @ _tf32(z))


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1])
def test_fp16_aligned_step_is_as_precise_as_tf32_products(seed):
    """An fp16 model's aligned step (the fp16 export's form) multiplies in fp16 (inplace_ttt._aligned_step), its
    update rounded to fp16 too. Against float64 on the same fp16-rounded weights, its output and new delta are as
    close as the fp32-product form's with TF32 inputs, the form it replaced on the GPU (within 1.25x: session 19 saw
    1.07-1.08x on the update). A delta as large as W0, so the fast part is half the output."""
    m16 = _mlp(dtype=torch.float16, seed=seed)[0]
    m64 = copy.deepcopy(m16).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, 64, generator=g).half()
    delta = float(m16.down_proj.weight.float().std()) * torch.randn(2, 64, m16.intermediate_size, generator=g)
    out, new = m16(x, {"delta": delta}, _ctx(x, aligned=True))
    assert out.dtype == torch.float16 and new["delta"].dtype == torch.float32
    want, want_new = m64(x.double(), {"delta": delta.double()}, _ctx(x, aligned=True))
    tf_out, tf_delta = _tf32_aligned_step(m16, x, delta)
    print(f"seed {seed}: output {rel_err(tf_out.double(), want):.1e} (TF32 form) / {rel_err(out.double(), want):.1e} "
          f"(fp16), delta {rel_err(tf_delta.double(), want_new['delta']):.1e} / "
          f"{rel_err(new['delta'].double(), want_new['delta']):.1e}")  # docs/results.md, session 10 (pytest -s)
    assert rel_err(out.double(), want) <= 1.25 * rel_err(tf_out.double(), want)
    assert rel_err(new["delta"].double(), want_new["delta"]) <= 1.25 * rel_err(tf_delta.double(), want_new["delta"])
    assert rel_err(new["delta"].double(), want_new["delta"]) < 1e-2  # the update itself is real, not zero


@torch.no_grad()
def test_aligned_model_steps_equal_one_shot():
    _, model, _ = _models("qwen3")
    ids = _ids(3, 3 * C + 4)
    out, state = _stream(model, ids, C, aligned=True)
    assert rel_err(out, model(ids)) <= TOL
    assert not any(k.endswith("pending_x") for k in state)


def test_aligned_step_exports_with_dynamic_batch_and_length():
    _, model, fw = _models("llama")

    class Step(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, position, k0, v0, k1, v1, d0, d1):
            state = {"position": position, "past_key_values.0.key": k0, "past_key_values.0.value": v0,
                     "past_key_values.1.key": k1, "past_key_values.1.value": v1,
                     "fast_weights.layers.0.mlp.delta": d0, "fast_weights.layers.1.mlp.delta": d1}
            logits, new = self.m.step(ids, state, aligned=True)
            return logits, new["fast_weights.layers.0.mlp.delta"], new["fast_weights.layers.1.mlp.delta"]

    def inputs(b, t, p):
        g = torch.Generator().manual_seed(b * 1000 + t * 10 + p)
        kv = torch.randn(b, 2, p, 16, generator=g)
        d = 0.01 * torch.randn(2, b, 64, 96, generator=g)
        return (_ids(b, t), torch.full((b,), p, dtype=torch.int64), kv, kv, kv, kv, d[0], d[1])

    batch, length, past = torch.export.Dim("batch"), torch.export.Dim("length", max=C), torch.export.Dim("past")
    kv = {0: batch, 2: past}
    shapes = ({0: batch, 1: length}, {0: batch}, kv, kv, kv, kv, {0: batch}, {0: batch})
    step = Step(model).eval()
    ep = torch.export.export(step, inputs(2, C, C), dynamic_shapes=shapes).module()
    for b, t, p in ((2, C, C), (3, 5, 2 * C), (1, C, 0), (2, 1, 3 * C)):
        args = inputs(b, t, p)
        with torch.no_grad():
            want, got = step(*args), ep(*args)
        assert all(rel_err(g, w) <= TOL for g, w in zip(got, want))
        updated = t == C  # the delta changes iff the step is a full chunk
        assert all(torch.equal(got[j], args[5 + j]) != updated for j in (1, 2))


# -- configuration helpers and errors ------------------------------------------------------------
def test_parse_layer_spec():
    assert parse_layer_spec("every:6", 30) == (0, 6, 12, 18, 24)
    assert parse_layer_spec("0,6,12", 30) == (0, 6, 12)
    assert parse_layer_spec(" 12, 0 ", 30) == (0, 12)
    assert parse_layer_spec("all", 3) == (0, 1, 2)
    assert parse_layer_spec("last:4", 30) == (26, 27, 28, 29)
    for bad in ("", "  ", "0,30", "0,6,6", "every:0", "last:31", "last:0", "1,,2", "-1", "every:x", "some", "1.5",
                "every:", "0,+6"):
        with pytest.raises(InputError):
            parse_layer_spec(bad, 30)


def test_check_config_and_state_size():
    _, model, fw = _models("llama")
    cfg = model.config
    check_ttt_config(cfg, fw)
    for bad in (dict(chunk_size=4), dict(chunk_size=cfg.max_position_embeddings + 1), dict(layers=()),
                dict(layers=(0, 0)), dict(layers=(2,)), dict(target="logits"), dict(lr=float("nan"))):
        with pytest.raises(InputError):
            check_ttt_config(cfg, InPlaceTTTConfig(**{**fw.__dict__, **bad}))
    smol = cfg.__class__(**{**cfg.to_dict(), "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30})
    five = InPlaceTTTConfig(layers=parse_layer_spec("every:6", 30), chunk_size=1024)
    assert state_floats_per_sequence(smol, five) == 5 * 576 * 1536  # 4.4M floats, as the spec says
    assert state_floats_per_sequence(smol, five, include_pending=True) == 5 * (576 * 1536 + 1023 * 576)


@torch.no_grad()
def test_bad_states_are_refused():
    m, _ = _mlp(dtype=torch.float32)
    x = torch.randn(2, 3, 64)
    with pytest.raises(InputError, match="same position"):
        m(x, m.init_state(2), _ctx(x, torch.tensor([0, 8])))
    with pytest.raises(InputError, match="pending"):
        m(x, m.init_state(2), _ctx(x, 3))
    emb, _ = _mlp("input_embed", dtype=torch.float32)
    with pytest.raises(InputError, match="embeddings"):
        emb(x, emb.init_state(2), _ctx(x))


@torch.no_grad()
def test_bf16_model_keeps_fp32_state():
    _, model, _ = _models("llama")
    model = model.to(torch.bfloat16)
    ids = _ids(1, 2 * C + 1)
    state = model.init_state(1)
    assert state["fast_weights.layers.0.mlp.delta"].dtype == torch.float32
    out, state = _stream(model, ids, 3, state)
    assert state["fast_weights.layers.1.mlp.delta"].dtype == torch.float32
    assert rel_err(out.float(), model(ids).float()) < 2e-2
    model = model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fast-weight math stays fp32 under autocast
        _, auto = model.step(ids, model.init_state(1))
    assert auto["fast_weights.layers.0.mlp.delta"].dtype == torch.float32
    assert rel_err(auto["fast_weights.layers.0.mlp.delta"], model.step(ids, model.init_state(1))[1][
        "fast_weights.layers.0.mlp.delta"]) < 5e-2
