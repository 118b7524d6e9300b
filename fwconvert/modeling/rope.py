"""Rotary position embeddings: inverse frequencies (default, linear, llama3 scaling) and application.

Matches transformers' ``_compute_*_rope_parameters`` so logits agree to fp32 rounding.
"""
from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [hd/2]
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    if sc["rope_type"] == "linear":
        return inv / sc["factor"]
    # llama3
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv_l)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions [B, T] (int64) -> cos, sin [B, T, hd] computed in fp32, cast to ``dtype``."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def interleaved_order(dim: int, device=None) -> torch.Tensor:
    """order [dim] (int64): the interleaved layout of a head's dims, ``x_interleaved = x[..., order]``. The pair
    (p, p + dim/2) that RoPE rotates together lands at (2p, 2p + 1): order = [0, h, 1, h + 1, ...], h = dim/2."""
    h = dim // 2
    return torch.stack((torch.arange(h, device=device), torch.arange(h, device=device) + h), dim=1).reshape(-1)


def interleaved_rotation_matrix(dim: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """R [dim, dim] with ``x @ R`` = the interleaved rotate: out[2p] = -x[2p + 1], out[2p + 1] = x[2p] (one ±1 per
    column); so that ``apply_rope(x[..., o], cos[..., o], sin[..., o], R) == apply_rope(x, cos, sin)[..., o]`` for
    o = ``interleaved_order(dim)`` (exactly: each output is the same two products). Exports rotate with it
    (exporters/onnx/graph.py::export_form): one matmul instead of slice, negate and concatenate."""
    r = torch.zeros(dim, dim, dtype=dtype, device=device)
    even = torch.arange(0, dim, 2, device=device)
    r[even + 1, even] = -1.0
    r[even, even + 1] = 1.0
    return r


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotation=None) -> torch.Tensor:
    """x [B, T, H, hd] (heads after positions: the layout of the projections, so no transpose comes first);
    cos/sin [B, T, hd]. ``rotation``: a matrix R with x @ R the rotated x (exports: ``interleaved_rotation_matrix``,
    x, cos and sin in the interleaved order); None: the half-split cat form."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return x * cos + (_rotate_half(x) if rotation is None else x @ rotation) * sin
