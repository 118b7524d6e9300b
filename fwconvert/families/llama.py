"""LLaMA (1/2/3.x, SmolLM, TinyLlama...): optional attention/MLP bias, llama3 rope scaling, tied or untied embeddings."""
from .base import Family, _bool_field


def _flags(raw: dict, source: str) -> dict:
    bias = _bool_field(raw, "attention_bias", source, False)
    return {"qkv_bias": bias, "o_bias": bias}


FAMILY = Family(name="llama", architectures=("LlamaForCausalLM",), flags=_flags)
