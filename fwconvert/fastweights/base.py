"""The contract between the decoder and a fast-weight mechanism.

A mechanism is an ``nn.Module`` that owns its slow parameters and a per-sequence state of named
tensors. The decoder calls it once per step with the new tokens' activations and its part of the
state, and gets back its output and the next state (never mutating the state it was given)::

    past state --+
                 v
    x [B,T,D] -> mechanism(x, state, ctx) -> out, present state

``forward`` from a fresh state on a whole sequence must equal streaming the same sequence in
pieces of any size. Torch only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

State = Dict[str, torch.Tensor]


@dataclass
class StepContext:
    """What a step knows besides the activations."""

    input_ids: torch.Tensor  # [B, T] int64: this step's tokens
    position: torch.Tensor  # [B] int64: absolute position of this step's first token
    embeddings: Optional[torch.Tensor] = None  # [B, T, D]: token embeddings (for input_embed targets)
    # True on the export path: the caller guarantees this step starts at a chunk boundary of every
    # chunked mechanism and holds at most one such chunk (a shorter one ends the document). A
    # mechanism may then take a shape-static, torch.export-friendly path and neither read nor
    # return its pending-token state.
    aligned: bool = False


class FastWeightModule(nn.Module):
    """Base class of stateful mechanisms. Subclasses implement ``state_shapes`` and ``forward``."""

    stateful = True
    # local state names that are sums over tokens of signals which largely cancel (their relative error in an fp16
    # graph is a multiple of the activations'; exporters/verify.py judges them with their own tolerance)
    cancelling_sums: Tuple[str, ...] = ()

    def state_shapes(self, batch_size: int) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """Local state name -> (shape, dtype) of a fresh state (all zeros unless ``init_state`` overrides)."""
        raise NotImplementedError

    def init_state(self, batch_size: int, device=None) -> State:
        return {k: torch.zeros(shape, dtype=dt, device=device) for k, (shape, dt) in self.state_shapes(batch_size).items()}

    def forward(self, x: torch.Tensor, state: State, ctx: StepContext):  # -> (out, new_state)
        raise NotImplementedError
