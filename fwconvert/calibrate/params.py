"""Which parameters calibration trains (``--train fast|fast+norms|all``, and the ``--baseline`` recipe).

fast        the parameters of the fast-weight modules that are not in the base checkpoint
            (FWL head weights and step sizes; in-place TTT ``ttt_conv``/``ttt_proj``)
fast+norms  plus every RMSNorm weight
fast+baseline  plus the plain parameters ``--baseline`` trains (W_down of the layers below), so that a
            fast-weight model and its baseline train the same slow parameters and differ only by the fast weights
all         every parameter

``--baseline`` drops the fast weights and calibrates the plain base model with the same recipe. Its
``fast`` set is W_down (``mlp.down_proj.weight``) of as many layers as it takes to reach at least the
number of parameters the fast-weight model adds: the TTT layers first (the very matrices in-place TTT
adapts), then layers from the last one backwards. So the baseline gets at least the fast-weight
model's trainable capacity as ordinary slow weights, and a gain cannot be plain fine-tuning.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from torch import nn

from ..config import InPlaceTTTConfig, ModelConfig
from ..errors import InputError, UsageError

MODES = ("fast", "fast+norms", "fast+baseline", "all")


def base_parameter_names(cfg: ModelConfig) -> set:
    """Names of the tensors a plain checkpoint of ``cfg`` holds (built on the meta device: no data)."""
    from ..modeling import build_model

    return set(build_model(cfg, None).state_dict().keys())


def count_new_parameters(cfg: ModelConfig, fast_weights) -> int:
    """How many parameters the fast-weight mechanism adds to the base model (meta device)."""
    from ..modeling import build_model

    if fast_weights is None:
        return 0
    base = base_parameter_names(cfg)
    return sum(p.numel() for n, p in build_model(cfg, fast_weights).named_parameters() if n not in base)


def baseline_layers(cfg: ModelConfig, fast_weights, n_new: int) -> List[int]:
    """Layers whose W_down the baseline trains (see module docstring); at least one."""
    per_layer = cfg.hidden_size * cfg.intermediate_size
    order = list(fast_weights.layers) if isinstance(fast_weights, InPlaceTTTConfig) else []
    order += [i for i in reversed(range(cfg.num_hidden_layers)) if i not in order]
    chosen: List[int] = []
    for i in order:
        if chosen and len(chosen) * per_layer >= n_new:
            break
        chosen.append(i)
    return sorted(chosen)


def _norm_names(model: nn.Module) -> set:
    from ..modeling.decoder import RMSNorm

    return {f"{m}.{n}" if m else n for m, mod in model.named_modules() if isinstance(mod, RMSNorm)
            for n, _ in mod.named_parameters(recurse=False)}


def select_trainable(model: nn.Module, mode: str, base_names: set,
                     baseline_layer_ids: Optional[Sequence[int]] = None) -> Dict[str, nn.Parameter]:
    """name -> parameter to train; every other parameter gets ``requires_grad=False``."""
    if mode not in MODES:
        raise UsageError(f"--train {mode!r} is not one of {', '.join(MODES)}")
    named = dict(model.named_parameters())
    if mode == "all":
        chosen = set(named)
    elif baseline_layer_ids is not None and (mode == "fast+baseline" or not (set(named) - base_names)):
        # the baseline (no new parameters), or a fast-weight model trained with the baseline's plain set
        chosen = {f"model.layers.{i}.mlp.down_proj.weight" for i in baseline_layer_ids}
        chosen |= {n for n in named if n not in base_names}
    else:
        chosen = {n for n in named if n not in base_names}
        if not chosen:
            raise InputError("the model has no fast-weight parameters to train; convert it first (add-fwl / "
                             "mark-fast), or use --baseline, or --train all")
    if mode == "fast+norms":
        chosen |= _norm_names(model)
    missing = sorted(chosen - set(named))
    if missing:
        raise InputError(f"parameters to train not found in the model: {', '.join(missing[:10])}")
    for n, p in named.items():
        p.requires_grad_(n in chosen)
    return {n: named[n] for n in sorted(chosen)}
