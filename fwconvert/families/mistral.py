"""Mistral: LLaMA layout plus a sliding attention window (``sliding_window``, null for none)."""
from ..errors import InputError
from .base import Family, _int_field


def _flags(raw: dict, source: str) -> dict:
    window = raw.get("sliding_window")
    if window is not None:
        window = _int_field(raw, "sliding_window", source)
    if raw.get("attention_bias"):
        raise InputError(f"{source}: attention_bias is not part of the mistral family")
    return {"sliding_window": window}


FAMILY = Family(name="mistral", architectures=("MistralForCausalLM",), flags=_flags)
