"""Infer an HF-style config from tensor shapes, for a bare .safetensors file without config.json.

Sizes (vocab, hidden, MLP, layers, tied embeddings, biases) are read from shapes. Head counts are
only unambiguous when per-head q/k norms are present (qwen3); otherwise a clear error names what is
missing and suggests ``--config``. Non-structural values (rope_theta, rms_norm_eps, context) take
transformers' defaults and the result is marked as inferred.
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

from ..errors import InputError

INFERRED_NOTE = "inferred from tensor shapes (rope_theta, rms_norm_eps and context length are defaults)"


def _shape(specs, name, source, found) -> Tuple[int, ...]:
    if name not in specs:
        got = ", ".join(f"{k}={v}" for k, v in found.items()) or "nothing"
        raise InputError(f"{source}: no config.json beside it and tensor {name!r} is missing, so the config cannot "
                         f"be inferred from shapes (inferred so far: {got}); pass --config FILE")
    return specs[name][0]


def infer_raw_config(specs: Dict[str, Tuple[Tuple[int, ...], str]], source: str) -> dict:
    """An HF-style raw config from tensor shapes, or InputError naming the fields that cannot be read."""
    found: dict = {}
    vocab, hidden = _shape(specs, "model.embed_tokens.weight", source, found)
    found.update(vocab_size=vocab, hidden_size=hidden)
    layers = {int(m.group(1)) for n in specs if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if not layers or layers != set(range(max(layers) + 1)):
        raise InputError(f"{source}: cannot infer num_hidden_layers: layer indices {sorted(layers)[:10]} "
                         f"are not 0..N-1; pass --config FILE")
    found["num_hidden_layers"] = len(layers)
    p = "model.layers.0."
    found["intermediate_size"] = _shape(specs, p + "mlp.gate_proj.weight", source, found)[0]
    q_rows = _shape(specs, p + "self_attn.q_proj.weight", source, found)[0]
    kv_rows = _shape(specs, p + "self_attn.k_proj.weight", source, found)[0]
    found["tie_word_embeddings"] = "lm_head.weight" not in specs
    has_qb, has_ob = p + "self_attn.q_proj.bias" in specs, p + "self_attn.o_proj.bias" in specs
    if p + "self_attn.q_norm.weight" not in specs:
        got = ", ".join(f"{k}={v}" for k, v in found.items())
        raise InputError(f"{source}: no config.json beside it; num_attention_heads, num_key_value_heads and "
                         f"model_type cannot be read from tensor shapes (q_proj has {q_rows} rows, k_proj "
                         f"{kv_rows}; inferred: {got}); pass --config FILE with the model's config.json")
    head_dim = specs[p + "self_attn.q_norm.weight"][0][0]
    if head_dim <= 0 or q_rows % head_dim or kv_rows % head_dim:
        raise InputError(f"{source}: q_norm size {head_dim} does not divide q_proj/k_proj rows; pass --config FILE")
    raw = {"model_type": "qwen3", "head_dim": head_dim, "num_attention_heads": q_rows // head_dim,
           "num_key_value_heads": kv_rows // head_dim, "attention_bias": has_qb and has_ob}
    raw.update(found)
    return raw
