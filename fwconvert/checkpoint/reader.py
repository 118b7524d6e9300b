"""``open_checkpoint``: find the weights and config of a model path and validate them header-only.

Accepts an HF folder (single or sharded safetensors, or exactly one .gguf), a bare ``.safetensors``
file (config beside it, from ``config_path``, or inferred from shapes) or a ``.gguf`` file. Nothing
here reads tensor data; ``Checkpoint.iter_tensors`` does, one tensor at a time.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Dict, Iterator, Optional, Tuple

from ..config import fast_weights_from_dict, load_json_strict
from ..errors import InputError, NumericError
from ..families import IGNORED_TENSOR_SUFFIXES, parse_config
from .gguf_source import GGUFWeights
from .infer import INFERRED_NOTE, infer_raw_config
from .paths import resolve_in_folder, short_repr
from .safetensors_source import INDEX_NAME, PICKLE_REFUSAL, PICKLE_SUFFIXES, SINGLE_NAME, SafetensorsWeights

PARTIAL_TAG = ".fwconvert-partial-"  # staging folders of checkpoint/writer.py: never read as a model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def _list_line(label: str, items, limit: int = 20, sep: str = ", ") -> str:
    items = list(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{label} ({len(items)}): " + sep.join(items[:limit]) + more


class Checkpoint:
    """A model checkpoint whose config and tensor headers have been validated (no data read yet)."""

    def __init__(self, path, kind, weights, raw_config, config_source, allow_unexpected, folder):
        self.path, self.kind, self._weights = path, kind, weights
        self._fingerprint: Optional[str] = None
        self.raw_config, self.config_source = raw_config, config_source
        self.allow_unexpected = allow_unexpected
        self.config = parse_config(raw_config, config_source)
        self.fast_weights = fast_weights_from_dict(raw_config.get("fast_weights"), config_source)
        self.specs: Dict[str, Tuple[Tuple[int, ...], str]] = weights.specs()
        self.data_files = weights.data_files
        self.tokenizer_files = _tokenizer_files(folder) if folder else []
        self.tokenizer_embedded = kind == "gguf" and weights.has_tokenizer  # load_tokenizer(path) works

    def _ignorable(self, name: str, expected) -> bool:
        if name.endswith(IGNORED_TENSOR_SUFFIXES):
            return True
        # Some tied checkpoints also store lm_head.weight; it is the embedding and is not loaded.
        return name == "lm_head.weight" and self.config.tie_word_embeddings and name not in expected

    def check_tensors(self, expected: Dict[str, tuple]) -> None:
        """InputError listing ALL missing, unexpected and mismatched tensors (header-only)."""
        missing = sorted(n for n in expected if n not in self.specs)
        unexpected = [] if self.allow_unexpected else sorted(
            n for n in self.specs if n not in expected and not self._ignorable(n, expected))
        mismatched = [f"{short_repr(n)}: got {list(self.specs[n][0])}, expected {list(s)}"
                      for n, s in expected.items() if n in self.specs and tuple(self.specs[n][0]) != tuple(s)]
        lines = []
        if missing:
            lines.append(_list_line("missing tensors", missing))
        if unexpected:
            lines.append(_list_line("unexpected tensors", (short_repr(n) for n in unexpected))
                         + " (pass --allow-unexpected to ignore them)")
        if mismatched:
            lines.append(_list_line("shape mismatches", mismatched, limit=200, sep="; "))
        if lines:
            raise InputError(f"{self.path}: checkpoint tensors do not match the config ({self.config_source}):\n"
                             + "\n".join(lines))

    def iter_tensors(self, names=None, check_finite: bool = True) -> Iterator[Tuple[str, "object"]]:
        """(name, torch.Tensor), read one tensor at a time; NumericError on NaN/Inf when check_finite."""
        if self.kind == "gguf":
            it = self._weights.iter_tensors(names, config=self.config)
        else:
            it = self._weights.iter_tensors(names)
        for name, t in it:
            if check_finite and t.is_floating_point():
                bad = _count_nonfinite(t)
                if bad:
                    where = self._weights.location[name] if self.kind != "gguf" else self.path
                    raise NumericError(f"{where}: tensor {short_repr(name)} has {bad} non-finite values (NaN/Inf)")
            yield name, t

    def fingerprint(self) -> str:
        """sha256 over the kind, the raw config, every data file's header and size, and samples of every tensor's
        bytes (``paths.sampled_digest``: its first, middle and last 4 KiB), so that a checkpoint whose values changed
        under the same headers is another input. Computed once per opened checkpoint."""
        if self._fingerprint is None:
            h = self._header_hash()
            for part in self._weights.sample_parts():
                h.update(part)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def header_fingerprint(self) -> str:
        """The fingerprint without the value samples: what manifests written before the samples existed record
        (``verify`` still accepts it from them)."""
        return self._header_hash().hexdigest()

    def _header_hash(self):
        h = hashlib.sha256(self.kind.encode())
        h.update(json.dumps(self.raw_config, sort_keys=True, default=str).encode())
        for part in self._weights.fingerprint_parts():
            h.update(part)
        return h


def _count_nonfinite(t, block: int = 1 << 20) -> int:
    """Non-finite values of ``t``, checked in blocks so the temporaries stay small."""
    import torch

    flat, bad = t.reshape(-1), 0
    for a in range(0, flat.numel(), block):
        ok = torch.isfinite(flat[a:a + block])
        if not bool(ok.all()):
            bad += int((~ok).sum())
    return bad


def _tokenizer_files(folder: str):
    out = []
    for name in TOKENIZER_FILES:
        p = os.path.join(folder, name)
        if os.path.lexists(p):
            resolve_in_folder(folder, name, folder, "tokenizer file")
            if os.path.isfile(p):
                out.append(p)
    return out


def _load_config(path: str, what: str) -> Tuple[dict, str]:
    raw = load_json_strict(path)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: {what} must be a JSON object")
    return raw, path


def _folder_weights(folder: str):
    """('hf-folder', weights) or ('gguf', GGUFWeights) for a model folder."""
    names = sorted(os.listdir(folder))
    if INDEX_NAME in names:
        return "hf-folder", SafetensorsWeights.from_index(folder, os.path.join(folder, INDEX_NAME))
    singles = [n for n in names if n.endswith(".safetensors")]
    if SINGLE_NAME in singles or len(singles) == 1:
        name = SINGLE_NAME if SINGLE_NAME in singles else singles[0]
        return "hf-folder", SafetensorsWeights.from_file(resolve_in_folder(folder, name, folder, "weights file"))
    if len(singles) > 1:
        raise InputError(f"{folder}: several .safetensors files but no {INDEX_NAME}: {', '.join(singles[:10])}")
    ggufs = [n for n in names if n.endswith(".gguf")]
    if len(ggufs) == 1:
        return "gguf", GGUFWeights(resolve_in_folder(folder, ggufs[0], folder, "GGUF file"))
    if len(ggufs) > 1:
        raise InputError(f"{folder}: several .gguf files ({', '.join(ggufs[:10])}); pass the one to use")
    if any(n.endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json") for n in names):
        raise InputError(f"{folder}: only pickle weights found: {PICKLE_REFUSAL}")
    if "model.onnx" in names and "manifest.json" in names:  # exporters.onnx's GRAPH_NAME / MANIFEST_NAME
        raise InputError(f"{folder}: an ONNX export (export-onnx), not a checkpoint; run, verify and eval --runtime "
                         "ort take it, and its manifest.json names the model it came from")
    raise InputError(f"{folder}: no model weights found (expected {SINGLE_NAME}, {INDEX_NAME} or one .gguf file)")


def _has_safetensors(folder: str) -> bool:
    return any(n.endswith((".safetensors", INDEX_NAME)) for n in os.listdir(folder))


def _has_gguf(folder: str) -> bool:
    return any(n.endswith(".gguf") for n in os.listdir(folder))


def open_checkpoint(path: str, config_path: Optional[str] = None, allow_unexpected: bool = False) -> Checkpoint:
    """Open ``path`` header-only: resolve files, parse and validate config and every tensor header."""
    path = os.path.abspath(str(path))
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"{path}: model path not found ({e.strerror})") from None
    if PARTIAL_TAG in os.path.basename(path):
        raise InputError(f"{path}: an unfinished fwconvert output (staging folder); rerun the command or remove it")
    explicit = _load_config(config_path, "config") if config_path else None
    if stat.S_ISDIR(st.st_mode):
        folder, cfg_file = path, os.path.join(path, "config.json")
        if explicit is None and (_has_safetensors(path) or (os.path.lexists(cfg_file) and not _has_gguf(path))):
            explicit = _load_config(cfg_file, "config")  # validated before any header is read
        if explicit is not None:
            parse_config(explicit[0], explicit[1])
        kind, weights = _folder_weights(path)
    elif not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file or folder")
    elif path.endswith(".gguf"):
        kind, weights, folder = "gguf", GGUFWeights(path), None
    elif path.endswith(".safetensors"):
        kind, weights, folder = "safetensors", SafetensorsWeights.from_file(path), os.path.dirname(path)
    elif path.endswith(PICKLE_SUFFIXES):
        raise InputError(f"{path}: {PICKLE_REFUSAL}")
    else:
        raise InputError(f"{path}: not a checkpoint (expected a model folder, a .safetensors or a .gguf file)")
    if explicit:
        raw, source = explicit
    elif kind == "gguf":
        raw, source = weights.raw_config(), f"{weights.path} (GGUF metadata)"
    elif os.path.exists(os.path.join(folder, "config.json")):
        raw, source = _load_config(os.path.join(folder, "config.json"), "config")
    else:
        raw, source = infer_raw_config(weights.specs(), path), f"{path} ({INFERRED_NOTE})"
    return Checkpoint(path, kind, weights, raw, source, allow_unexpected, folder)
