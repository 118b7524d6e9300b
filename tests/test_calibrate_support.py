"""Helpers shared by the calibration and evaluation tests (no tests here).

Documents are random but structured: each has its own small set of 8-token phrases repeated in a
random order, so a fast-weight mechanism (or dynamic evaluation) has something to pick up in context.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

from fwconvert.calibrate.data import Document
from fwconvert.config import FWLConfig
from fwconvert.families import parse_config
from fwconvert.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def phrase_doc(rng: np.random.Generator, length: int, vocab: int = 256, phrases: int = 6, width: int = 8) -> np.ndarray:
    table = rng.integers(0, vocab, (phrases, width))
    return np.concatenate([table[j] for j in rng.integers(0, phrases, length // width + 1)])[:length]


def phrase_docs(n: int = 6, length: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Document(f"doc{i}", phrase_doc(rng, length).astype(np.int64)) for i in range(n)]


def write_token_docs(folder, n: int = 8, length: int = 400, seed: int = 0) -> str:
    os.makedirs(folder, exist_ok=True)
    for d in phrase_docs(n, length, seed):
        np.save(os.path.join(folder, f"{d.name}.tokens.npy"), d.ids.astype(np.int32))
    return str(folder)


TINY_CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64,
                   intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
                   torch_dtype="float32")


def tiny_model(fw=None, seed: int = 0):
    """A tiny llama DecoderLM (fp32, cpu; built without transformers, which is slow to import) with random
    base weights and ``fw`` attached at its conversion values (so it equals the base model)."""
    cfg = parse_config(dict(TINY_CONFIG), "config")
    model = build_model(cfg, fw, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    base = build_model(cfg, None, device="meta").state_dict().keys()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in base:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name
                        else 0.2 * torch.randn(p.shape, generator=gen))
        for mod in model.stateful_modules().values():
            if isinstance(fw, FWLConfig):
                from fwconvert.fastweights.fwl import init_conversion_
            else:
                from fwconvert.fastweights.inplace_ttt import init_conversion_
            init_conversion_(mod, gen)
    model.reset_buffers()
    return model.eval(), cfg


def save_tiny(folder, fw=None, seed: int = 0) -> str:
    """Write ``tiny_model(fw)`` as a converted fwconvert folder (the convert helper's writer)."""
    from fwconvert.convert import save_model

    model, _ = tiny_model(fw, seed)
    return save_model(model, str(folder))


def run_cli(args, env_extra=None, timeout=180):
    """``python -m fwconvert ARGS`` as a real subprocess (same thread count as this process)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fwconvert", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
