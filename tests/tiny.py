"""Tiny random checkpoints of each family, made with transformers' own classes (nothing downloaded).

``make_hf_model(family)`` returns a transformers model with non-trivial random weights;
``save_checkpoint(model, dir)`` writes it sharded (several safetensors + index) so the sharded
reading path always runs.
"""
from __future__ import annotations

import os

import torch

FAMILY_KW = {
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                  max_position_embeddings=512, tie_word_embeddings=True),
    "mistral": dict(sliding_window=24, max_position_embeddings=512),
    "qwen2": dict(max_position_embeddings=512),
    "qwen3": dict(head_dim=24, max_position_embeddings=512),
}
FAMILIES = tuple(FAMILY_KW)


def hf_config(family: str, **overrides):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
    kw.update(FAMILY_KW[family])
    kw.update(overrides)
    return cls(**kw)


def make_hf_model(family: str = "llama", seed: int = 0, std: float = 0.2, **overrides):
    """A transformers model of ``family`` with random weights (norm weights around 1)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model.eval()


def save_checkpoint(model, directory: str, shard_kb: int = 60) -> str:
    """Save as an HF folder with several shards; returns the folder."""
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, max_shard_size=f"{shard_kb}KB")
    return directory


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
