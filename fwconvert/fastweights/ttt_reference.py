"""In-place TTT reference definitions (Feng et al., "In-Place Test-Time Training", ICLR 2026).

Slow and explicit, for tests and verify only: the chunk-local depthwise conv is written tap by tap,
the sequential form materialises the fast weight W (d x d_ff) and updates it after every chunk, the
dual form is block-causal linear attention. All work in the dtype given (use float64 in tests).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["ttt_target_ref", "ttt_hidden_ref", "inplace_ttt_sequential_ref", "inplace_ttt_dual_ref"]


def ttt_hidden_ref(x, gate_w, up_w, gate_b=None, up_b=None):
    """Z = SiLU(x W_gate^T) * (x W_up^T): the MLP hidden activations [B, L, F]."""
    return F.silu(x @ gate_w.T + (0 if gate_b is None else gate_b)) * (x @ up_w.T + (0 if up_b is None else up_b))


def ttt_target_ref(t, conv_w, proj_w, chunk_size):
    """V_hat = Conv1D(t) @ P with the conv applied per chunk (zero outside the chunk) [B, L, D].

    ``conv_w`` [D, 1, K] (cross-correlation, tap k looks at offset k - K//2), ``proj_w`` [D, D] or None."""
    _, length, _ = t.shape
    k = conv_w.shape[-1]
    half = k // 2
    v = torch.zeros_like(t)
    for s in range(length):
        for tap in range(k):
            src = s + tap - half
            if 0 <= src < length and src // chunk_size == s // chunk_size:
                v[:, s] += conv_w[:, 0, tap] * t[:, src]
    return v if proj_w is None else v @ proj_w


def _base(z, down_w, down_b):
    return z @ down_w.T + (0 if down_b is None else down_b)


def inplace_ttt_sequential_ref(x, t, gate_w, up_w, down_w, conv_w, proj_w, lr: float, chunk_size: int,
                               delta0: Optional[torch.Tensor] = None, gate_b=None, up_b=None, down_b=None):
    """Apply-then-update, one chunk at a time, with the fast weight materialised.

    x [B, L, D] MLP inputs, t [B, L, D] the target's input (x itself for ``hidden_states``), ``delta0``
    [B, D, F] an initial fast-weight delta (default 0). Returns (out [B, L, D], delta [B, D, F]) where
    delta = W - W0 after every COMPLETE chunk (a ragged last chunk gives no update)."""
    b, length, _ = x.shape
    z = ttt_hidden_ref(x, gate_w, up_w, gate_b, up_b)  # [B, L, F]
    v = ttt_target_ref(t, conv_w, proj_w, chunk_size)  # [B, L, D]
    w = down_w.expand(b, *down_w.shape).clone()  # [B, D, F]
    if delta0 is not None:
        w = w + delta0
    outs = []
    for a in range(0, length, chunk_size):
        zc, vc = z[:, a:a + chunk_size], v[:, a:a + chunk_size]
        outs.append(zc @ w.transpose(1, 2) + (0 if down_b is None else down_b))  # W from before the chunk
        if zc.shape[1] == chunk_size:
            w = w + lr * vc.transpose(1, 2) @ zc  # W += eta * V_hat^T Z
    return torch.cat(outs, 1), w - down_w


def inplace_ttt_dual_ref(x, t, gate_w, up_w, down_w, conv_w, proj_w, lr: float, chunk_size: int,
                         delta0: Optional[torch.Tensor] = None, gate_b=None, up_b=None, down_b=None):
    """O = Z W0^T + eta [(Z Z^T) * M] V_hat with M[s, t] = 1 iff chunk(t) < chunk(s) (+ Z delta0^T).

    Returns out [B, L, D] only (the dual form has no explicit weight)."""
    length = x.shape[1]
    z = ttt_hidden_ref(x, gate_w, up_w, gate_b, up_b)
    v = ttt_target_ref(t, conv_w, proj_w, chunk_size)
    chunk = torch.arange(length, device=x.device) // chunk_size
    mask = (chunk[None, :] < chunk[:, None]).to(z.dtype)  # [L, L]: row s, column t
    out = _base(z, down_w, down_b) + lr * ((z @ z.transpose(1, 2)) * mask) @ v
    if delta0 is not None:
        out = out + z @ delta0.transpose(1, 2)
    return out
