"""A flat-tensor module around ``DecoderLM.step`` for torch.export, and the state layout it exposes.

    forward(input_ids, position, *past)  ->  (logits, next_position, *present)

The state keys are those ``step(aligned=True)`` returns (a mechanism may drop pending-token state on
the aligned path); their order is fixed here and recorded in the manifest.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from fwconvert.errors import InputError
from fwconvert.modeling.decoder import DecoderLM

from .io_spec import BATCH, KV_PREFIX, PAST


class ChunkStep(nn.Module):
    """``DecoderLM.step`` with flat tensor inputs/outputs in a fixed key order."""

    def __init__(self, model: DecoderLM, state_keys: Sequence[str], aligned: bool):
        super().__init__()
        self.model = model
        self.state_keys = list(state_keys)  # "position" first
        self.aligned = aligned

    def forward(self, input_ids: torch.Tensor, *flat_state: torch.Tensor):
        state = dict(zip(self.state_keys, flat_state))
        logits, new = self.model.step(input_ids, state, aligned=self.aligned)
        return (logits, *[new[k] for k in self.state_keys])


def aligned_chunk_size(model: DecoderLM):
    """The chunk length every step must have (chunked mechanisms on the aligned path), or None."""
    fw = model.fast_weights
    if fw is not None and getattr(fw, "kind", None) == "inplace_ttt":
        return int(fw.chunk_size)
    return None


def _batch_axes(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """Which axis of each state tensor is the batch axis (the one that differs between B=1 and B=2)."""
    out = {}
    for k, t in a.items():
        diff = [i for i, (x, y) in enumerate(zip(t.shape, b[k].shape)) if x != y]
        if len(diff) != 1 or t.dim() != b[k].dim():
            raise InputError(f"state tensor {k!r}: cannot tell its batch axis from shapes {list(t.shape)} / {list(b[k].shape)}")
        out[k] = diff[0]
    return out


def initial_state(model: DecoderLM, batch: int, fixed_window: bool, aligned: bool, device="cpu") -> Dict[str, torch.Tensor]:
    """The state the graph carries: ``init_state`` restricted to what ``step(aligned)`` returns."""
    full = model.init_state(batch, device=device, fixed_window=fixed_window)
    ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
    with torch.no_grad():
        _, new = model.step(ids, full, aligned=aligned)
    missing = sorted(set(new) - set(full))
    if missing:
        raise InputError(f"step returns state {missing} that init_state does not create")
    keys = ["position"] + [k for k in full if k != "position" and k in new]
    return {k: full[k] for k in keys}


def state_layout(model: DecoderLM, fixed_window: bool, aligned: bool) -> Tuple[List[str], Dict[str, List]]:
    """Ordered state keys and each one's symbolic shape (``batch``, ``past`` or ints)."""
    one = initial_state(model, 1, fixed_window, aligned)
    two = initial_state(model, 2, fixed_window, aligned)
    axes = _batch_axes(one, two)
    shapes = {}
    for k, t in one.items():
        shape: List = list(t.shape)
        shape[axes[k]] = BATCH
        if k.startswith(KV_PREFIX) and not fixed_window:
            shape[2] = PAST
        shapes[k] = shape
    return list(one), shapes
