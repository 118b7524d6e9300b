"""Builders of valid and malformed checkpoint files for the hostile-input tests (reusable by any test).

``st_bytes(entries)`` writes safetensors bytes from an explicit header so every corruption can be
expressed; ``single_file_model`` / ``sharded_model`` give tiny valid checkpoints to break; and
``tree_snapshot`` lets a test prove that nothing was written.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

DT = {"F32": np.float32, "F16": np.float16}


def st_bytes(tensors: dict, metadata=None, header_text: str = None, trailing: bytes = b"") -> bytes:
    """safetensors bytes for ``{name: np.ndarray}`` (in that order); ``header_text`` replaces the JSON."""
    header, blobs, pos = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[a.dtype]
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    text = header_text if header_text is not None else json.dumps(header)
    hb = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(hb)) + hb + b"".join(blobs) + trailing


def raw_st(header: dict, data: bytes) -> bytes:
    """safetensors bytes from a literal header dict and data blob (no consistency at all)."""
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def small_tensors(n: int = 2) -> dict:
    rng = np.random.default_rng(0)
    return {f"t{i}": rng.standard_normal((4, 3)).astype(np.float32) for i in range(n)}


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def tiny_config(**overrides) -> dict:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
           "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    cfg.update(overrides)
    return cfg


def tiny_tensors(cfg: dict, seed: int = 0) -> dict:
    """Random fp32 weights with the HF names/shapes of ``cfg`` (llama layout)."""
    from fwconvert.families import expected_tensors, parse_config

    rng = np.random.default_rng(seed)
    shapes = expected_tensors(parse_config(cfg, "config"))
    return {n: (0.2 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}


def write_config(folder, cfg) -> str:
    os.makedirs(folder, exist_ok=True)
    return write(os.path.join(folder, "config.json"), json.dumps(cfg).encode())


def single_file_model(folder, cfg=None, tensors=None) -> str:
    """A folder with config.json + model.safetensors; returns the folder."""
    cfg = cfg or tiny_config()
    write_config(folder, cfg)
    write(os.path.join(folder, "model.safetensors"), st_bytes(tensors if tensors is not None else tiny_tensors(cfg)))
    return str(folder)


def sharded_model(folder, cfg=None, tensors=None, n_shards: int = 2, index_edit=None) -> str:
    """config.json + ``n_shards`` shards + model.safetensors.index.json (optionally edited)."""
    cfg = cfg or tiny_config()
    tensors = tensors if tensors is not None else tiny_tensors(cfg)
    write_config(folder, cfg)
    names = list(tensors)
    wm, total = {}, 0
    for k in range(n_shards):
        part = {n: tensors[n] for n in names[k::n_shards]}
        shard = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        write(os.path.join(folder, shard), st_bytes(part))
        wm.update({n: shard for n in part})
        total += sum(a.nbytes for a in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": wm}
    if index_edit:
        index_edit(index)
    write(os.path.join(folder, "model.safetensors.index.json"), json.dumps(index).encode())
    return str(folder)


def tree_snapshot(root) -> dict:
    """{relative path: (size, mtime_ns)} of everything under ``root`` (links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out
