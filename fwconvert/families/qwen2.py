"""Qwen2 / Qwen2.5: LLaMA layout with biases on the q, k and v projections (not on o_proj)."""
from ..errors import InputError
from .base import Family, _bool_field


def _flags(raw: dict, source: str) -> dict:
    if _bool_field(raw, "use_sliding_window", source, False):
        raise InputError(f"{source}: use_sliding_window=true is not supported for qwen2 (per-layer windows)")
    return {"qkv_bias": True}


FAMILY = Family(name="qwen2", architectures=("Qwen2ForCausalLM",), flags=_flags)
