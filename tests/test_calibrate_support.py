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
from fwconvert.modeling import build_model, load_tensors
from tiny import make_hf_model

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


def tiny_model(fw=None, seed: int = 0):
    """A tiny llama DecoderLM (fp32, cpu) with ``fw`` attached at its conversion values."""
    hf = make_hf_model("llama", seed=seed)
    cfg = parse_config(hf.config.to_dict(), "config")
    sd = hf.state_dict()
    full = build_model(cfg, fw, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in full.stateful_modules().values():
            if isinstance(fw, FWLConfig):
                from fwconvert.fastweights.fwl import init_conversion_
            else:
                from fwconvert.fastweights.inplace_ttt import init_conversion_
            init_conversion_(mod, gen)
    new = [(k, v) for k, v in full.state_dict().items() if k not in sd]
    return load_tensors(build_model(cfg, fw), list(sd.items()) + new), cfg


def run_cli(args, env_extra=None, timeout=180):
    """``python -m fwconvert ARGS`` as a real subprocess (same thread count as this process)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fwconvert", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
