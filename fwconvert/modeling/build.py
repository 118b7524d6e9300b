"""Build a DecoderLM from a config on the meta device, attach fast weights, and load tensors into it.

Loading streams tensors (one shard at a time from the checkpoint reader) straight into place with
``load_state_dict(assign=True)``: the model is never materialised twice.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

from ..config import FWLConfig, InPlaceTTTConfig, ModelConfig
from ..errors import InputError
from .decoder import DecoderLM

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def attach_fast_weights(model: DecoderLM, fast_weights) -> DecoderLM:
    """Give ``model`` the fast-weight modules ``fast_weights`` describes (parameters uninitialised on meta)."""
    model.fast_weights = fast_weights
    if fast_weights is None:
        return model
    if isinstance(fast_weights, FWLConfig):
        from ..fastweights.fwl import FWLHead

        model.fwl_head = FWLHead(model.config, fast_weights)
    elif isinstance(fast_weights, InPlaceTTTConfig):
        from ..fastweights.inplace_ttt import InPlaceTTTMLP

        for i in fast_weights.layers:
            model.model.layers[i].mlp = InPlaceTTTMLP(model.config, fast_weights)
    else:
        raise TypeError(f"unknown fast-weight config {fast_weights!r}")
    return model


@contextlib.contextmanager
def _parameters_on_meta():
    """Create every new parameter on the meta device (no memory, no init cost).

    Cheaper than ``with torch.device("meta")``, whose function mode imports torch._dynamo (seconds per process)."""
    orig = nn.Module.register_parameter

    def register(module, name, param):
        orig(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def build_model(cfg: ModelConfig, fast_weights=None, window: Optional[int] = None, device="meta",
                sinks: int = 0) -> DecoderLM:
    if str(device) == "meta":
        with _parameters_on_meta():
            model = DecoderLM(cfg, window=window, sinks=sinks)
            attach_fast_weights(model, fast_weights)
        return model
    with torch.device(device):
        model = DecoderLM(cfg, window=window, sinks=sinks)
        attach_fast_weights(model, fast_weights)
    return model


def expected_shapes(model: DecoderLM) -> dict:
    """Checkpoint key -> shape the model needs (works on a meta model: no data)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_tensors(model: DecoderLM, tensors: Iterable[Tuple[str, torch.Tensor]], device="cpu", dtype=None) -> DecoderLM:
    """Assign checkpoint tensors into a meta-built model, casting to ``dtype`` (default: keep fp32 for
    non-float16 checkpoints). Every expected tensor must arrive exactly once."""
    expected = expected_shapes(model)
    seen = set()
    for name, t in tensors:
        if name not in expected:
            continue  # the reader already refused unexpected keys unless explicitly allowed
        if tuple(t.shape) != expected[name]:
            raise InputError(f"tensor {name!r}: got shape {list(t.shape)}, expected {list(expected[name])}")
        target = dtype if dtype is not None else (t.dtype if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32)
        model.load_state_dict({name: t.to(device=device, dtype=target)}, strict=False, assign=True)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""
        raise InputError(f"checkpoint is missing {len(missing)} tensors: {', '.join(missing[:20])}{more}")
    model.reset_buffers()
    return model
