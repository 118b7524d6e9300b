"""What every LLaMA-family decoder shares: config parsing/validation and the HF tensor key map.

A family file (llama.py, mistral.py, qwen2.py, qwen3.py) only says what differs: which flags it
reads (qkv bias, q/k norm, sliding window, rope scaling) via a ``Family`` record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..config import ModelConfig
from ..errors import InputError

# Caps applied before anything is allocated (reliability test 3).
LIMITS = {
    "hidden_size": (1, 65536),
    "intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 4096),
    "vocab_size": (1, 1 << 22),
    "max_position_embeddings": (1, 1 << 24),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple
    # raw config -> extra ModelConfig kwargs (qkv_bias, qk_norm, sliding_window, ...)
    flags: Callable[[dict, str], dict]


def _int_field(raw: dict, key: str, source: str, default: Optional[int] = None) -> int:
    v = raw.get(key, default)
    if v is None:
        raise InputError(f"{source}: required field {key!r} is missing")
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputError(f"{source}: field {key!r} must be an integer, got {v!r}")
    lo, hi = LIMITS.get(key, (1, 1 << 40))
    if not lo <= v <= hi:
        raise InputError(f"{source}: field {key!r} = {v} is outside the supported range [{lo}, {hi}]")
    return v


def _float_field(raw: dict, key: str, source: str, default: float) -> float:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0) or v != v or v == float("inf"):
        raise InputError(f"{source}: field {key!r} must be a positive finite number, got {v!r}")
    return float(v)


def _bool_field(raw: dict, key: str, source: str, default: bool) -> bool:
    v = raw.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InputError(f"{source}: field {key!r} must be true or false, got {v!r}")
    return v


def rope_settings(raw: dict, source: str) -> tuple:
    """(rope_theta, rope_scaling or None) from old (`rope_theta`, `rope_scaling`) or new (`rope_parameters`) fields."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or None
    if not isinstance(params, dict) or (scaling is not None and not isinstance(scaling, dict)):
        raise InputError(f"{source}: rope_parameters / rope_scaling must be objects")
    theta = raw.get("rope_theta", params.get("rope_theta", 10000.0))
    theta = _float_field({"rope_theta": theta}, "rope_theta", source, 10000.0)
    merged = dict(scaling or {})
    merged.update({k: v for k, v in params.items() if k != "rope_theta"})
    rtype = merged.get("rope_type", merged.get("type", "default"))
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise InputError(f"{source}: rope type {rtype!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rtype == "default":
        return theta, None
    out = {"rope_type": rtype}
    keys = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[rtype]
    for k in keys:
        v = merged.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise InputError(f"{source}: rope scaling field {k!r} must be a positive number, got {v!r}")
        out[k] = v
    return theta, out


def build_config(family: Family, raw: dict, source: str) -> ModelConfig:
    """Validate a raw HF config dict into a ModelConfig; every check happens before any allocation."""
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise InputError(f"{source}: hidden_act {act!r} is not supported (supported: silu)")
    hidden = _int_field(raw, "hidden_size", source)
    heads = _int_field(raw, "num_attention_heads", source)
    kv = _int_field(raw, "num_key_value_heads", source, default=heads)
    if raw.get("head_dim") is None:
        if hidden % heads:
            raise InputError(f"{source}: num_attention_heads ({heads}) does not divide hidden_size ({hidden})")
        head_dim = hidden // heads
    else:
        head_dim = _int_field(raw, "head_dim", source)
    if heads % kv:
        raise InputError(f"{source}: num_key_value_heads ({kv}) does not divide num_attention_heads ({heads})")
    if head_dim % 2:
        raise InputError(f"{source}: head_dim ({head_dim}) must be even for rotary embeddings")
    theta, scaling = rope_settings(raw, source)
    dtype = raw.get("torch_dtype", raw.get("dtype"))
    kw = dict(
        family=family.name,
        vocab_size=_int_field(raw, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_int_field(raw, "intermediate_size", source),
        num_hidden_layers=_int_field(raw, "num_hidden_layers", source),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=_int_field(raw, "max_position_embeddings", source, default=2048),
        rms_norm_eps=_float_field(raw, "rms_norm_eps", source, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=_bool_field(raw, "tie_word_embeddings", source, False),
        mlp_bias=_bool_field(raw, "mlp_bias", source, False),
        torch_dtype=dtype if isinstance(dtype, str) else None,
        raw=raw,
    )
    kw.update(family.flags(raw, source))
    return ModelConfig(**kw)


def expected_tensors(cfg: ModelConfig) -> dict:
    """HF tensor name -> shape for the base decoder (no fast weights)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    out = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        for name, shape in (("q_proj", (q, d)), ("k_proj", (kv, d)), ("v_proj", (kv, d))):
            out[p + f"self_attn.{name}.weight"] = shape
            if cfg.qkv_bias:
                out[p + f"self_attn.{name}.bias"] = (shape[0],)
        out[p + "self_attn.o_proj.weight"] = (d, q)
        if cfg.o_bias:
            out[p + "self_attn.o_proj.bias"] = (d,)
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (hd,)
            out[p + "self_attn.k_norm.weight"] = (hd,)
        for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            out[p + f"mlp.{name}.weight"] = shape
            if cfg.mlp_bias:
                out[p + f"mlp.{name}.bias"] = (shape[0],)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    return out


# Tensors some checkpoints carry that are recomputed, never loaded.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


def num_parameters(cfg: ModelConfig) -> int:
    n = 0
    for shape in expected_tensors(cfg).values():
        k = 1
        for s in shape:
            k *= s
        n += k
    return n
