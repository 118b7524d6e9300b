"""What ``fwconvert inspect`` reports about a checkpoint, as a plain dict (headers only, no tensor data).

Architecture, parameter count and dtypes from the tensor headers, the file layout, and the fast
weights a converted model carries with their per-sequence state size (from the modules' own
``state_shapes`` on a meta-device model, so nothing is allocated).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Optional

from .checkpoint import open_checkpoint
from .config import fast_weights_to_dict
from .families import expected_tensors


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _fast_weights_info(model, fw) -> Optional[dict]:
    if fw is None:
        return None
    info = fast_weights_to_dict(fw)
    tensors, floats, nbytes = {}, 0, 0
    for owner, mod in model.stateful_modules().items():
        for name, (shape, dtype) in mod.state_shapes(1).items():
            tensors[f"{owner}.{name}"] = list(shape)
            floats += _numel(shape)
            nbytes += _numel(shape) * dtype.itemsize
    info["state_per_sequence"] = {"floats": floats, "bytes": nbytes, "tensors": tensors}
    if fw.kind == "inplace_ttt":
        info["ttt_layers"] = list(fw.layers)
        # plus, while a chunk is incomplete, up to chunk_size - 1 pending tokens' inputs per TTT layer
        pending = len(fw.layers) * (fw.chunk_size - 1) * model.config.hidden_size
        info["state_per_sequence"]["pending_floats_max"] = pending
    elif fw.kind == "fwl":
        info["head_size"], info["head_hidden"] = fw.size, fw.hidden
    return info


def _files(ck) -> list:
    return [{"path": p, "bytes": os.stat(p).st_size} for p in ck.data_files]


def describe(path: str, config_path: Optional[str] = None, allow_unexpected: bool = False) -> dict:
    """A JSON-ready description of the checkpoint at ``path``; raises InputError on any mismatch."""
    ck = open_checkpoint(path, config_path=config_path, allow_unexpected=allow_unexpected)
    model = None
    if ck.fast_weights is None:
        expected = expected_tensors(ck.config)  # no torch needed for a plain model
    else:
        from .modeling import build_model, expected_shapes

        model = build_model(ck.config, ck.fast_weights)  # on the meta device: no memory
        expected = expected_shapes(model)
    ck.check_tensors(expected)
    c = ck.config
    loaded = {n: s for n, s in ck.specs.items() if n in expected}
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
    files = _files(ck)
    return {
        "path": ck.path,
        "family": c.family,
        "num_hidden_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "sliding_window": c.sliding_window,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "qkv_bias": c.qkv_bias,
        "qk_norm": c.qk_norm,
        "num_parameters": sum(_numel(s) for s, _ in loaded.values()),
        "dtypes": dict(sorted(Counter(d for _, d in loaded.values()).items())),
        "kv_cache_floats_per_token": kv_per_token,
        "layout": {"kind": ck.kind, "files": files, "total_bytes": sum(f["bytes"] for f in files),
                   "num_tensors": len(ck.specs), "tokenizer_files": [os.path.basename(p) for p in ck.tokenizer_files],
                   "tokenizer_embedded": ck.tokenizer_embedded},
        "config_source": ck.config_source,
        "fast_weights": _fast_weights_info(model, ck.fast_weights),
    }
