"""GGUF import: llama.cpp metadata -> an HF-style raw config, tensors dequantized to fp32 with HF names.

Matches transformers' own GGUF loading (``modeling_gguf_pytorch_utils.py``): the same config keys,
tied embeddings when there is no ``output.weight``, ``gguf.dequantize``, and for the ``llama``
architecture the inverse of the q/k row permutation llama.cpp's converter applies.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Dict, Iterator, List, Tuple

from ..errors import InputError
from .paths import open_regular, sampled_digest, short_repr, stat_regular

# GGUF architecture -> our family; transformers maps llama files named "*mistral*" to mistral.
ARCHITECTURES = ("llama", "qwen2", "qwen3")
CONFIG_KEYS = {  # "<arch>.<key>" -> HF config field
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
EXTRA_KEYS = {"llama": {"rope.dimension_count": "head_dim"}, "qwen2": {}, "qwen3": {"attention.key_length": "head_dim"}}
TOKEN_KEYS = {"tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
              "tokenizer.ggml.padding_token_id": "pad_token_id"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
IGNORED = ("rope_freqs.weight",)  # transformers drops it too
_BLOCK = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_TOP = re.compile(r"([a-z_]+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """The HF tensor name of a llama.cpp tensor name (unknown names are returned unchanged)."""
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in BLOCK_NAMES:
        return f"model.layers.{int(m.group(1))}.{BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = _TOP.fullmatch(gguf_name)
    if m and m.group(1) in TOP_NAMES:
        return f"{TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return gguf_name


def unpermute_rows(w, n_head: int):
    """Inverse of llama.cpp's ``permute`` of q/k rows (rotary halves interleaved per head)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _scalar(field, path: str):
    """The single value of a GGUF metadata field (int, float, bool or str); InputError otherwise."""
    import numpy as np

    if len(field.types) != 1 or len(field.data) != 1:
        raise InputError(f"{path}: GGUF metadata key {field.name!r} must hold a single value")
    v = field.parts[field.data[0]]
    if field.types[0].name == "STRING":
        return bytes(v).decode("utf-8", errors="replace")
    v = v[0]
    return bool(v) if isinstance(v, np.bool_) else (int(v) if np.issubdtype(v.dtype, np.integer) else float(v))


def _diagnose(path: str, error: Exception) -> str:
    """Why ``gguf.GGUFReader`` failed on ``path``, in a user's terms where the header can still be read: the first
    tensor whose data lies past the end of the file (a truncated download or copy); else the reader's own error."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFReader

    sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}  # GGML type id -> (block size, bytes per block)

    class _InfoOnly(GGUFReader):  # reads the header and the tensor table, builds no tensor views
        def _build_tensors(self, start_offs, fields):
            self.extents = []
            for f in fields:
                _, name, _, dims, raw_type, offset = f.parts
                block, size = sizes[int(raw_type[0])]
                n = int(np.prod(dims.astype(np.int64))) * size // block
                self.extents.append((bytes(name).decode("utf-8", "replace"), int(start_offs + offset[0]), n))

    size = os.path.getsize(path)
    try:
        extents = _InfoOnly(path, "r").extents
    except Exception:  # noqa: BLE001 - the header itself is cut or corrupt
        return (f"its header (metadata and tensor table) is corrupt or cut short; the file is {size} bytes; "
                f"{type(error).__name__}: {error}")
    past = [(name, start, n) for name, start, n in extents if start + n > size]
    if not past:
        return f"{type(error).__name__}: {error}"
    name, start, n = past[0]
    return (f"truncated: the file ends at byte {size}, but tensor {name!r} needs bytes {start}..{start + n} "
            f"({len(past)} of {len(extents)} tensors lie past the end); download or copy it again")


class GGUFWeights:
    """A GGUF file opened header-only (memory-mapped by ``gguf.GGUFReader``)."""

    def __init__(self, path: str):
        stat_regular(path, "GGUF file")
        os.close(open_regular(path, "GGUF file"))  # a regular file that opens without blocking
        try:
            from gguf import GGUFReader

            self.reader = GGUFReader(path, "r")
        except ImportError:
            raise InputError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from None
        except Exception as e:  # noqa: BLE001 - any parse failure of an untrusted file is bad input
            raise InputError(f"{path}: not a valid GGUF file ({_diagnose(path, e)})") from None
        self.path = path
        self.arch = self._str("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise InputError(f"{path}: GGUF architecture {self.arch!r} is not supported "
                             f"(supported: {', '.join(ARCHITECTURES)})")
        self.tensors = {hf_name(t.name): t for t in self.reader.tensors if t.name not in IGNORED}
        if len(self.tensors) != len([t for t in self.reader.tensors if t.name not in IGNORED]):
            raise InputError(f"{path}: the same tensor name appears twice in the GGUF file")

    def _str(self, key: str) -> str:
        f = self.reader.fields.get(key)
        if f is None:
            raise InputError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return _scalar(f, self.path)

    def raw_config(self) -> dict:
        """An HF-style config dict, as transformers builds it from the GGUF metadata."""
        fields, arch = self.reader.fields, self.arch
        name = _scalar(fields["general.name"], self.path) if "general.name" in fields else ""
        model_type = "mistral" if arch == "llama" and "mistral" in name else arch
        raw = {"model_type": model_type, "architectures": [f"{model_type.capitalize()}ForCausalLM"]}
        for key, hf in {**CONFIG_KEYS, **EXTRA_KEYS[arch]}.items():
            if f"{arch}.{key}" in fields:
                raw[hf] = _scalar(fields[f"{arch}.{key}"], self.path)
        for key, hf in TOKEN_KEYS.items():
            if key in fields:
                raw[hf] = _scalar(fields[key], self.path)
        if "vocab_size" not in raw and "tokenizer.ggml.tokens" in fields:
            raw["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
        raw["tie_word_embeddings"] = "lm_head.weight" not in self.tensors
        if arch == "qwen2":
            raw["use_sliding_window"] = False
        return raw

    @property
    def has_tokenizer(self) -> bool:
        """Whether the file embeds a vocabulary (``load_tokenizer`` can build a tokenizer from it)."""
        return "tokenizer.ggml.tokens" in self.reader.fields

    @property
    def data_files(self) -> List[str]:
        return [self.path]

    def specs(self) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        return {n: (tuple(int(s) for s in reversed(t.shape)), t.tensor_type.name) for n, t in self.tensors.items()}

    def fingerprint_parts(self) -> List[bytes]:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            h.update(f.read(int(self.reader.data_offset)))
        return [h.digest(), str(self.reader.data.size).encode()]

    def sample_parts(self) -> List[bytes]:
        """``sampled_digest`` over the tensors, in file-table order."""
        fd = open_regular(self.path, "GGUF file")
        try:
            extents = [(t.name, int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in self.reader.tensors]
            return [sampled_digest(fd, extents, self.path).encode()]
        finally:
            os.close(fd)

    def iter_tensors(self, names=None, config=None) -> Iterator[Tuple[str, "object"]]:
        """(HF name, fp32 torch tensor), dequantized one at a time; q/k un-permuted for llama."""
        import numpy as np
        import torch
        from gguf import dequantize

        wanted = None if names is None else set(names)
        for name, t in self.tensors.items():
            if wanted is not None and name not in wanted:
                continue
            try:
                w = dequantize(t.data, t.tensor_type)
            except Exception as e:  # noqa: BLE001 - malformed tensor data in an untrusted file
                raise InputError(f"{self.path}: tensor {short_repr(t.name)} cannot be dequantized ({e})") from None
            w = w.reshape(tuple(int(s) for s in reversed(t.shape)))
            if self.arch == "llama" and config is not None:
                if ".self_attn.q_proj." in name:
                    w = unpermute_rows(w, config.num_attention_heads)
                elif ".self_attn.k_proj." in name:
                    w = unpermute_rows(w, config.num_key_value_heads)
            w = np.ascontiguousarray(w, dtype=np.float32)
            yield name, torch.from_numpy(w if w.flags.writeable else w.copy())  # never a view of the mmap
