"""Slow, obviously-correct FWL definitions (Clark et al. 2022) used by tests and verify only.

For every (b, t): autograd's gradient of the prefix loss Σ_{s<t} ℓ_s w.r.t. the fast parameters at the slow
weights, the explicit step θ_t = θ − η ⊙ g, and the slow block re-run at (b, t). With ``create_graph=True``
the inner gradients stay in the graph, so outer (meta) gradients flow through them. Shares no code with fwl.py.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

FAST_NAMES_REF = ("w1", "b1", "w2", "b2", "gamma", "beta")  # the order of the step sizes


def fwl_params_ref(head) -> Dict[str, torch.Tensor]:
    """The fast parameters of an FWLHead in math layout (W1 [D, H], W2 [H, S]), still in the autograd graph."""
    return {"w1": head.fc1.weight.t(), "b1": head.fc1.bias, "w2": head.fc2.weight.t(), "b2": head.fc2.bias,
            "gamma": head.norm.weight, "beta": head.norm.bias}


def fwl_block_ref(params: Dict[str, torch.Tensor], x: torch.Tensor, eps: float) -> torch.Tensor:
    """r = γ ⊙ LayerNorm(relu(x W1 + b1)² W2 + b2) + β, with torch's own layer_norm."""
    a = torch.relu(x @ params["w1"] + params["b1"]) ** 2
    z2 = a @ params["w2"] + params["b2"]
    return F.layer_norm(z2, (z2.shape[-1],), weight=params["gamma"], bias=params["beta"], eps=eps)


def fwl_slow_logits_ref(params, x: torch.Tensor, U: torch.Tensor, eps: float) -> torch.Tensor:
    """Logits of the residual design at the given (slow) parameters: (x + r(x)) Uᵀ."""
    return (x + fwl_block_ref(params, x, eps)) @ U.t()


def _prefix_loss(params, x_prefix, labels, U, normalizer, eps):
    logits = fwl_slow_logits_ref(params, x_prefix, U, eps)  # [t, V]
    return F.cross_entropy(logits, labels, reduction="sum") / normalizer


def fwl_logits_ref(params: Dict[str, torch.Tensor], step_sizes: torch.Tensor, x: torch.Tensor, input_ids: torch.Tensor,
                   U: torch.Tensor, normalizer: float, eps: float, create_graph: bool = False) -> torch.Tensor:
    """Logits [B, T, V] of the FWL model from a fresh state on x [B, T, D] (final normed hidden states)
    with labels y_s = input_ids[:, s+1]. One explicit SGD step per (b, t) on the loss of the strict prefix."""
    params = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
    names = list(FAST_NAMES_REF)
    rows = []
    for b in range(x.shape[0]):
        cols = []
        for t in range(x.shape[1]):
            if t == 0:
                fast = params  # nothing before position 0: the slow weights
            else:
                loss = _prefix_loss(params, x[b, :t], input_ids[b, 1:t + 1], U, normalizer, eps)
                grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
                fast = {n: params[n] - step_sizes[i] * g for i, (n, g) in enumerate(zip(names, grads))}
            cols.append(fwl_slow_logits_ref(fast, x[b, t], U, eps))
        rows.append(torch.stack(cols))
    return torch.stack(rows)


__all__ = ["fwl_params_ref", "fwl_block_ref", "fwl_slow_logits_ref", "fwl_logits_ref", "FAST_NAMES_REF"]
