"""Write a random-weight LLaMA model folder of a given shape (transformers LlamaForCausalLM, safetensors) plus a
copied tokenizer, so fwconvert can convert, calibrate and export it with nothing downloaded.

    python benchmarks/make_shape_model.py /tmp/w1b/base --shape llama1b --dtype bf16 \
        --tokenizer-from /tmp/fw-assets/SmolLM2-135M-Instruct.Q4_1.gguf

Weights: N(0, 0.02) for every matrix (embedding included), 1 for the RMSNorm weights, drawn directly in the
target dtype from ``--seed`` (activations stay well inside fp16's range). The tokenizer's vocabulary may be
smaller than the model's (SmolLM2's 49152 < 128256): its ids are all valid.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import LLAMA_1B_SHAPE  # noqa: E402

TINY_SHAPE = dict(LLAMA_1B_SHAPE, vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
SHAPES = {"llama1b": LLAMA_1B_SHAPE, "tiny": TINY_SHAPE}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def random_llama(shape: dict, dtype: torch.dtype, seed: int = 0, std: float = 0.02):
    """LlamaForCausalLM of ``shape`` with N(0, std) matrices and unit norms, built without a float32 pass."""
    import transformers

    kw = {k: v for k, v in shape.items() if k not in ("model_type", "architectures")}
    cfg = transformers.LlamaConfig(**kw, initializer_range=std)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied embeddings appear once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype).mul_(std))
    model.tie_weights()
    return model.eval()


def copy_tokenizer(src: str, out: str) -> list:
    """Tokenizer files into ``out``: a GGUF file's embedded vocabulary, or the files of a folder / tokenizer.json."""
    if src.endswith(".gguf"):
        from fwconvert.tokenizer import export_tokenizer

        return export_tokenizer(src, out)
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
    if "tokenizer.json" not in names:
        raise SystemExit(f"{src}: no tokenizer.json there")
    for n in names:
        shutil.copyfile(os.path.join(folder, n), os.path.join(out, n))
    return [os.path.join(out, n) for n in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama1b")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", help="a GGUF file, or a folder / tokenizer.json to copy the tokenizer from")
    a = ap.parse_args(argv)
    model = random_llama(SHAPES[a.shape], DTYPES[a.dtype], a.seed)
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True, max_shard_size="50GB")
    toks = copy_tokenizer(a.tokenizer_from, a.out) if a.tokenizer_from else []
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.out}: {a.shape} {a.dtype}, {n / 1e6:.1f}M parameters, tokenizer files: "
          f"{', '.join(sorted(os.path.basename(t) for t in toks)) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
