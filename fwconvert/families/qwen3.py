"""Qwen3: LLaMA layout with a per-head RMSNorm on queries and keys (q_norm, k_norm), explicit head_dim."""
from ..errors import InputError
from .base import Family, _bool_field


def _flags(raw: dict, source: str) -> dict:
    if _bool_field(raw, "use_sliding_window", source, False):
        raise InputError(f"{source}: use_sliding_window=true is not supported for qwen3 (per-layer windows)")
    bias = _bool_field(raw, "attention_bias", source, False)
    return {"qk_norm": True, "qkv_bias": bias, "o_bias": bias}


FAMILY = Family(name="qwen3", architectures=("Qwen3ForCausalLM",), flags=_flags)
