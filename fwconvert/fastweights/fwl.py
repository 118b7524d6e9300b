"""Fast Weight Layer head (Clark et al. 2022, "Meta-Learning Fast Weight Language Models", arXiv 2212.02475).

Design (attached to a pretrained decoder, not trained from scratch): a residual on the final normed hidden
state x, ``logits = (x + r) Uᵀ``, U = the base unembedding [V, D] (slow, never a fast weight), with the block
``r = γ ⊙ LN(relu(x W1 + b1)² W2 + b2) + β`` (H = 4S, S = D). Fast parameters θ = {W1, b1, W2, b2, γ, β}:
at every position t the block runs with θ_t = θ − η ⊙ Σ_{s<t} ∇_θ ℓ_s(θ), all gradients at the slow θ, where
ℓ_s = CE((x_s + r_θ(x_s)) Uᵀ, y_s) / N, y_s = token s+1 and N = ``FWLConfig.normalizer`` (a fixed constant).
Step sizes: the TF variant, six learned scalars η = ``fwl_head.step_sizes`` in the order W1, b1, W2, b2, γ, β.
At conversion (``init_conversion_``) γ = β = 0 and η = 0, so r = 0 exactly and logits equal the base model's;
calibration then learns γ, β, η and the dense weights (∂loss/∂γ, ∂loss/∂β, ∂loss/∂η_γ, ∂loss/∂η_β ≠ 0 there).

The per-token gradient signals δ are written by hand (the spec's formulas) and the fast outputs are strictly
causal linear attention (query = fast-path layer input, key = slow-path layer input, value = δ), computed with
mixed chunk attention (exclusive cumulative sum of per-chunk KᵀV + an intra-chunk quadratic term; a ragged last
chunk is zero-padded). Bias sums ride along as a constant-1 key feature (query η_b), and the LN affine sums Γ, Β
are causal cumulative sums (``causal_cumsum``: a triangular product in the export, no cumsum kernel). No
per-position weights are ever built. Keys are shifted by one: key j of a step is the position whose label y is
input token j of this step, i.e. the carried last position of the previous step (``pending_x``, weight 0 at
document start) followed by positions 0..T-2; query t then sees keys j ≤ t, which is exactly s < t in absolute
positions. State (per sequence, fp32; float64 when the model runs in float64)::

    sum_fc1 [B,D',H] = Σ [x_s; 1; 0] ⊗ δ1_s   (rows 0..D-1: the W1 sum Σ x_s ⊗ δ1_s; row D: the b1 sum Σ δ1_s)
    sum_fc2 [B,H',S] = Σ [a_s; 1; 0] ⊗ δ2_s   (rows 0..H-1: the W2 sum; row H: the b2 sum)
    sum_gamma [B,S] = Σ δh_s ⊙ x̂_s  sum_beta [B,S] = Σ δh_s   pending_x [B,D] (last position, label not yet seen)

with D' = ``padded(D)``, H' = ``padded(H)``: n + 1 rounded up to a multiple of ``FEATURE_ALIGN``, the rows past
the bias row zero (they stay zero: their key feature is 0). One product per layer and step updates the weight and
bias sums together, and the sums are the linear attention's prefix as they are (no reduction over the step for
the biases, no concatenation per step).

``pending_x`` is read and returned on every path, the export (``ctx.aligned``) path included.
Checkpoint keys: ``fwl_head.fc1.weight`` [H, D], ``fc1.bias`` [H], ``fc2.weight`` [S, H], ``fc2.bias`` [S],
``norm.weight`` (γ) [S], ``norm.bias`` (β) [S], ``step_sizes`` [6]. The head computes in fp32 whatever the model
dtype, except the three V-sized products with U, which run in U's dtype (as the base LM head does) with
fp32 results; it adds r to h in fp32 before casting back, so r = 0 leaves the logits bit-identical.
Cost per token: three V-sized products with U (slow logits, δh = δlogit U, output logits) plus the block.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FWLConfig, ModelConfig
from ..errors import InputError
from .base import FastWeightModule, State, StepContext

STEP_SIZE_NAMES = ("w1", "b1", "w2", "b2", "gamma", "beta")  # order of fwl_head.step_sizes (TF variant)
SUM_NAMES = ("sum_fc1", "sum_fc2", "sum_gamma", "sum_beta")
FEATURE_ALIGN = 8  # the dense updates' key feature axis [k, 1, 0...] is padded to a multiple of this (_dense_update)


def padded(n: int) -> int:
    """n features plus the constant-1 bias feature, zero-padded to a multiple of ``FEATURE_ALIGN``."""
    return n + 1 + (-(n + 1) % FEATURE_ALIGN)


def bias_key(k: torch.Tensor) -> torch.Tensor:
    """[k, 1, 0...] [B, T, padded(dk)]: the key with the constant-1 bias feature and the zero padding."""
    pad = padded(k.shape[-1]) - k.shape[-1] - 1
    return torch.cat((k, torch.ones_like(k[..., :1]), torch.zeros_like(k[..., :1]).expand(*k.shape[:-1], pad)), -1)


def validate_fwl_config(cfg: ModelConfig, fw: FWLConfig) -> None:
    """InputError unless ``fw`` can be attached to a model of ``cfg`` (residual design: S = D)."""
    if not isinstance(fw.size, int) or fw.size <= 0:
        raise InputError(f"fast_weights.size must be a positive integer, got {fw.size!r}")
    if fw.size != cfg.hidden_size:
        raise InputError(f"fast_weights.size {fw.size} must equal hidden_size {cfg.hidden_size} "
                         "(the FWL block is a residual on the final hidden state, unembedded by the base LM head)")
    if not isinstance(fw.chunk_size, int) or fw.chunk_size <= 0:
        raise InputError(f"fast_weights.chunk_size must be a positive integer, got {fw.chunk_size!r}")
    for name in ("normalizer", "eps"):
        v = getattr(fw, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise InputError(f"fast_weights.{name} must be a finite number > 0, got {v!r}")


def layer_norm(z: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``z`` over the last axis (biased variance, like nn.LayerNorm) and 1/std."""
    mu = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt((z - mu).pow(2).mean(-1, keepdim=True) + eps)
    return (z - mu) * rstd, rstd


def causal_linear_attention(q, k, v, prefix, chunk: Optional[int]) -> torch.Tensor:
    """``out_t = q_t·prefix + Σ_{j≤t} (q_t·k_j) v_j`` for q, k [B, T, dk], v [B, T, dv], prefix [B, dk, dv].

    Mixed chunk attention with chunk ``chunk`` (None: the whole step is one chunk); the last chunk may be
    ragged (zero-padded keys and values contribute nothing). Returns [B, T, dv]."""
    b, t, dk = q.shape
    if chunk is None:
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()  # [T, T]
        scores = (q @ k.transpose(1, 2)).masked_fill(~mask, 0.0)  # [B, T, T]
        return q @ prefix + scores @ v
    c = min(chunk, t)
    g = (t + c - 1) // c
    pad = g * c - t
    qc, kc, vc = (F.pad(a, (0, 0, 0, pad)).reshape(b, g, c, a.shape[-1]) for a in (q, k, v))  # [B, G, C, d]
    kv = kc.transpose(2, 3) @ vc  # [B, G, dk, dv]
    before = torch.cat((torch.zeros_like(kv[:, :1]), kv[:, :-1].cumsum(1)), 1)  # exclusive cumsum over chunks
    mask = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # [C, C]
    scores = (qc @ kc.transpose(2, 3)).masked_fill(~mask, 0.0)  # [B, G, C, C]
    out = qc @ (prefix[:, None] + before) + scores @ vc  # [B, G, C, dv]
    return out.reshape(b, g * c, -1)[:, :t]


def causal_cumsum(v, carried, chunk: Optional[int]) -> torch.Tensor:
    """``carried + Σ_{j≤t} v_j`` for v [B, T, dv], carried [B, 1, dv]: ``causal_linear_attention`` with unit
    queries and keys, without its rank-1 products. The whole-step form (``chunk`` None, the export) multiplies
    by a lower-triangular matrix of ones: one GEMM on the GPU, where onnxruntime's CUDA ``CumSum`` loops over
    the prefix of every element. The chunked form (PyTorch) is ``cumsum``."""
    if chunk is None:
        t = v.shape[1]
        return carried + torch.ones(t, t, dtype=v.dtype, device=v.device).tril() @ v
    return carried + v.cumsum(1)


def slow_signals(p: Dict[str, torch.Tensor], xk, labels, weights, U, normalizer: float, eps: float) -> Dict[str, torch.Tensor]:
    """Slow-path activations and per-token gradient signals δ at the slow weights ``p`` (math layout), and the
    keys of both layers' dense updates (``bias_key``).

    xk [B, T, D] key positions, labels [B, T] their next tokens, weights [B, T] (0: no loss), U [V, D] (the
    products with U run in U's dtype; everything else in xk's dtype)."""
    z1 = xk @ p["w1"] + p["b1"]  # [B, T, H]
    a = torch.relu(z1).square()
    xh, rstd = layer_norm(a @ p["w2"] + p["b2"], eps)  # [B, T, S]
    logits = F.linear((xk + p["gamma"] * xh + p["beta"]).to(U.dtype), U)  # [B, T, V], in U's dtype
    scale = (weights / normalizer)[..., None]  # [B, T, 1]
    # δlogit U = (p - onehot(y)) U w/N: [B, T, S]. The vocabulary-sized tensors stay in U's dtype (an fp16 graph's
    # softmax reads fp16 logits and accumulates in fp32, as torch's does) and the per-token scale w/N multiplies
    # the [B, T, S] product, not the [B, T, V] probabilities: the same value, without fp32 copies of [B, T, V]
    # (measured at batch 8 on SmolLM2: casts, an fp32 softmax and an fp32 product over 4,096 x 49,152 values).
    dh = scale * ((torch.softmax(logits, -1) @ U).to(xk.dtype) - U[labels].to(xk.dtype))
    dxh = dh * p["gamma"]
    d2 = rstd * (dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True))  # LayerNorm backward
    d1 = ((2.0 * d2) @ p["w2"].t()) * torch.relu(z1)  # squared-ReLU backward (the exact ×2 on the S-wide side)
    return {"k1": bias_key(xk), "k2": bias_key(a), "xh": xh, "dh": dh, "d1": d1, "d2": d2}


def _dense_update(eta_w, eta_b, q, key, delta, prefix, chunk):
    """η_W (q_t·M + Σ_{s<t} (q_t·k_s) δ_s) + η_b (Σδ + Σ_{s<t} δ_s) as ONE linear attention: the bias sum is a
    constant-1 key feature, the step sizes scale the query: query [η_W q, η_b, 0...], key [k, 1, 0...]
    (``bias_key``), prefix [M; Σδ; 0...] (the state ``sum_fc1``/``sum_fc2`` as it is). Returns the update
    [B, T, dv] and the new prefix (prefix + keyᵀ δ: the weight and the bias sums in one product).

    The feature axis is zero-padded from dk + 1 to a multiple of ``FEATURE_ALIGN`` (zeros add exact zeros): with
    dk + 1 odd (577, 2305 for SmolLM2) the rows of query, key and prefix were not 16-byte aligned, and cuBLAS ran
    their four fp32 products on the GPU as slow unaligned kernels (``align1``, 0.47 ms of FWL's step at batch 8 on
    the H200, session 8's profile)."""
    one = torch.ones_like(q[..., :1])  # [B, T, 1]
    zero = torch.zeros_like(q[..., :1]).expand(*q.shape[:-1], key.shape[-1] - q.shape[-1] - 1)
    query = torch.cat((eta_w * q, eta_b * one, zero), -1)  # [B, T, dk']
    return causal_linear_attention(query, key, delta, prefix, chunk), prefix + key.transpose(1, 2) @ delta


def fast_residual(p, eta, x, sig, sums: State, eps: float, chunk: Optional[int]):
    """The block at the fast weights θ_t for every query position of x [B, T, D]; returns (r, new sums)."""
    d1, d2, dh, s = sig["d1"], sig["d2"], sig["dh"], sig["dh"].shape[-1]
    u1, fc1 = _dense_update(eta[0], eta[1], x, sig["k1"], d1, sums["sum_fc1"], chunk)
    z1 = x @ p["w1"] + p["b1"] - u1
    a = torch.relu(z1).square()  # fast-path activations are layer 2's queries
    u2, fc2 = _dense_update(eta[2], eta[3], a, sig["k2"], d2, sums["sum_fc2"], chunk)
    z2 = a @ p["w2"] + p["b2"] - u2
    xh = F.layer_norm(z2, z2.shape[-1:], eps=eps)  # one LayerNormalization node in the export (no 1/std needed)
    values = torch.cat((dh * sig["xh"], dh), -1)  # [B, T, 2S]
    carried = torch.cat((sums["sum_gamma"], sums["sum_beta"]), -1)[:, None]  # [B, 1, 2S]
    gb = causal_cumsum(values, carried, chunk)  # [B, T, 2S]: Γ_t, Β_t (the LN affine sums)
    r = (p["gamma"] - eta[4] * gb[..., :s]) * xh + (p["beta"] - eta[5] * gb[..., s:])
    new = {"sum_fc1": fc1, "sum_fc2": fc2,  # [B, D', H], [B, H', S]
           "sum_gamma": gb[:, -1, :s],  # the inclusive sum at the last position: the carried sums plus all of
           "sum_beta": gb[:, -1, s:]}  # this step's (two reductions over the step fewer)
    return r, new


class FWLHead(FastWeightModule):
    """The FWL block as a residual before the base unembedding (see the module docstring)."""

    cancelling_sums = SUM_NAMES  # sums of δ-weighted terms

    def __init__(self, cfg: ModelConfig, fw: FWLConfig):
        super().__init__()
        validate_fwl_config(cfg, fw)
        self.fw = fw
        d, s = cfg.hidden_size, fw.size
        self.fc1 = nn.Linear(d, fw.hidden)  # W1 = fc1.weight.T [D, H], b1 = fc1.bias
        self.fc2 = nn.Linear(fw.hidden, s)  # W2 = fc2.weight.T [H, S], b2 = fc2.bias
        self.norm = nn.LayerNorm(s, eps=fw.eps)  # γ = norm.weight, β = norm.bias (used functionally)
        self.step_sizes = nn.Parameter(torch.zeros(len(STEP_SIZE_NAMES)))  # η, order STEP_SIZE_NAMES

    def state_shapes(self, batch_size: int):
        b, d, s, h = batch_size, self.fc1.in_features, self.fw.size, self.fw.hidden
        f32 = torch.float32
        return {"sum_fc1": ((b, padded(d), h), f32), "sum_fc2": ((b, padded(h), s), f32),
                "sum_gamma": ((b, s), f32), "sum_beta": ((b, s), f32), "pending_x": ((b, d), f32)}

    def slow_params(self, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """θ at the slow weights in math layout (W1 [D, H], W2 [H, S]), cast to ``dtype``."""
        return {"w1": self.fc1.weight.t().to(dtype), "b1": self.fc1.bias.to(dtype),
                "w2": self.fc2.weight.t().to(dtype), "b2": self.fc2.bias.to(dtype),
                "gamma": self.norm.weight.to(dtype), "beta": self.norm.bias.to(dtype)}

    def forward(self, h: torch.Tensor, state: State, ctx: StepContext, unembed_weight: torch.Tensor):
        """h [B, T, D] final normed hidden states of this step -> (logits [B, T, V], new state)."""
        cdt = torch.promote_types(h.dtype, torch.float32)  # the head computes in fp32 (fp64 for fp64 models)
        x = h.to(cdt)
        st = {k: v.to(cdt) for k, v in state.items()}
        t = x.shape[1]
        xk = torch.cat((st["pending_x"][:, None], x), 1)[:, :t]  # [B, T, D]: key j's label is input_ids[:, j]
        later = torch.arange(t, device=x.device)[None, :] > 0  # [1, T]
        weights = (later | (ctx.position > 0)[:, None]).to(cdt)  # [B, T]: 0 only for a pending slot at position 0
        p = self.slow_params(cdt)
        sig = slow_signals(p, xk, ctx.input_ids, weights, unembed_weight, float(self.fw.normalizer), self.fw.eps)
        chunk = None if ctx.aligned else self.fw.chunk_size
        r, new = fast_residual(p, self.step_sizes.to(cdt), x, sig, st, self.fw.eps, chunk)
        new["pending_x"] = x[:, -1]
        logits = F.linear((x + r).to(h.dtype), unembed_weight)  # r == 0 exactly at conversion
        return logits, new


@torch.no_grad()
def init_conversion_(head: FWLHead, generator: Optional[torch.Generator] = None, std: float = 0.02) -> FWLHead:
    """Conversion values: dense weights ~ N(0, std) (non-zero, so calibration has directions to use), biases,
    γ, β and all step sizes 0 (so the converted model's logits equal the base model's exactly).
    A head still on the meta device is first materialised on the generator's device (default cpu)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if any(p.is_meta for p in head.parameters()):
        head.to_empty(device=gen_device)
    for lin in (head.fc1, head.fc2):  # drawn on the generator's device: the same values wherever the head lives
        w = torch.empty(lin.weight.shape, dtype=torch.float32, device=gen_device)
        lin.weight.copy_(w.normal_(0.0, std, generator=generator))
        lin.bias.zero_()
    head.norm.weight.zero_()
    head.norm.bias.zero_()
    head.step_sizes.zero_()
    return head


__all__ = ["FWLHead", "init_conversion_", "validate_fwl_config", "causal_linear_attention", "slow_signals",
           "fast_residual", "layer_norm", "padded", "bias_key", "STEP_SIZE_NAMES", "SUM_NAMES", "FEATURE_ALIGN"]
