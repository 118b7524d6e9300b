"""Tokenizers: ``tokenizer.json`` beside a checkpoint (size-capped and validated before use) or a
GGUF file's embedded vocabulary (through transformers' GGUF support; no network).

``load_tokenizer(path)`` returns an object with ``encode(text) -> list[int]``, ``decode(ids)`` and
``eos_token_id``. ``encode`` adds special tokens the way transformers does by default.
"""
from __future__ import annotations

import os
from typing import List, Optional

from .config import load_json_strict
from .errors import InputError

TOKENIZER_JSON_CAP = 64 << 20


class Tokenizer:
    """A thin wrapper over a ``tokenizers.Tokenizer`` or a transformers tokenizer."""

    def __init__(self, backend, eos_token_id: Optional[int], source: str, hf: bool = False):
        self._tok, self._hf, self.source = backend, hf, source
        self.eos_token_id = eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        if self._hf:
            return list(self._tok.encode(text, add_special_tokens=add_special_tokens))
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self._tok) if self._hf else self._tok.get_vocab_size(with_added_tokens=True)


def _check_ids(doc: dict, path: str, vocab_size: Optional[int]) -> None:
    """Token ids must be unique integers in [0, vocab_size); at most vocab_size tokens."""
    if not isinstance(doc, dict):
        raise InputError(f"{path}: a tokenizer definition must be a JSON object")
    model = doc.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    pairs = list(vocab.items()) if isinstance(vocab, dict) else []  # BPE/WordPiece: token -> id
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...] (ids are positions)
        pairs = []
    for t in doc.get("added_tokens") or []:
        if isinstance(t, dict):
            pairs.append((t.get("content"), t.get("id")))
    names = set(vocab) if isinstance(vocab, dict) else set()
    n = (len(vocab) if isinstance(vocab, (dict, list)) else 0) + sum(1 for t, _ in pairs[len(names):] if t not in names)
    if vocab_size is not None and n > vocab_size:
        raise InputError(f"{path}: {n} tokens but the model's vocab_size is {vocab_size}")
    hi = vocab_size if vocab_size is not None else 1 << 31
    seen = {}
    for tok, i in pairs:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < hi:
            raise InputError(f"{path}: token {tok!r} has id {i!r} outside the range [0, {hi})"
                             + (" (vocab_size of config.json)" if vocab_size is not None else ""))
        if i in seen and seen[i] != tok:
            raise InputError(f"{path}: id {i} is used by two tokens: {seen[i]!r} and {tok!r}")
        seen[i] = tok


def _json_obj(path: str) -> dict:
    doc = load_json_strict(path, cap=TOKENIZER_JSON_CAP)
    return doc if isinstance(doc, dict) else {}


def _eos_id(folder: str, tok) -> Optional[int]:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            eos = _json_obj(p).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str) and tok.token_to_id(eos) is not None:
                return tok.token_to_id(eos)
    p = os.path.join(folder, "config.json")
    if os.path.isfile(p):
        eos = _json_obj(p).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int) and not isinstance(eos, bool):
            return eos
    return None


def _from_json(path: str, vocab_size: Optional[int]) -> Tokenizer:
    from tokenizers import Tokenizer as RawTokenizer

    doc = load_json_strict(path, cap=TOKENIZER_JSON_CAP)
    _check_ids(doc, path, vocab_size)
    try:
        with open(path, encoding="utf-8") as f:
            tok = RawTokenizer.from_str(f.read(TOKENIZER_JSON_CAP + 1))
    except Exception as e:  # noqa: BLE001 - the tokenizers library rejects malformed definitions
        raise InputError(f"{path}: not a valid tokenizer definition ({e})") from None
    return Tokenizer(tok, _eos_id(os.path.dirname(path), tok), path)


def _from_gguf(path: str) -> Tokenizer:
    from .checkpoint.paths import stat_regular

    stat_regular(path, "GGUF file")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: cannot build a tokenizer from the GGUF vocabulary ({e})") from None
    return Tokenizer(tok, tok.eos_token_id, path, hf=True)


def load_tokenizer(path: str, vocab_size: Optional[int] = None) -> Tokenizer:
    """The tokenizer of a model folder, a ``tokenizer.json`` file, a .safetensors file's folder or a GGUF file.

    ``vocab_size`` (default: the folder's config.json) bounds the token ids."""
    path = os.path.abspath(str(path))
    if path.endswith(".gguf"):
        return _from_gguf(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    tj = path if path.endswith("tokenizer.json") else os.path.join(folder, "tokenizer.json")
    if os.path.lexists(tj):
        if vocab_size is None and os.path.isfile(os.path.join(folder, "config.json")):
            v = _json_obj(os.path.join(folder, "config.json")).get("vocab_size")
            vocab_size = v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
        return _from_json(tj, vocab_size)
    ggufs = sorted(n for n in os.listdir(folder) if n.endswith(".gguf")) if os.path.isdir(folder) else []
    if len(ggufs) == 1:
        return _from_gguf(os.path.join(folder, ggufs[0]))
    raise InputError(f"{folder}: no tokenizer found (expected tokenizer.json or a single .gguf file)")


def export_tokenizer(path: str, folder: str) -> List[str]:
    """Write the tokenizer of ``path`` (e.g. a GGUF file's vocabulary) as HF files into ``folder``.

    Returns the written paths (tokenizer.json, tokenizer_config.json, ...), for a converted output
    of a GGUF model, which has no tokenizer files to copy."""
    tok = load_tokenizer(path)
    if not tok._hf:
        raise InputError(f"{path}: already has tokenizer files; copy them instead")
    written = tok._tok.save_pretrained(folder)
    return [os.path.abspath(p) for p in written if os.path.isfile(p)]
