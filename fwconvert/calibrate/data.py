"""Calibration and evaluation data: local documents only, validated before any training starts.

Inputs: text files and folders (walked recursively, sorted, filtered by extension) tokenized with the
model's own tokenizer, or pre-tokenized files: ``*.tokens.npy`` (a 1-D integer array, one document)
and ``*.tokens.bin`` (raw little-endian int32, one document). Each document is kept whole; a
training sequence is a window of ONE document (documents shorter than the window are skipped).
The held-out split is by document, chosen by a seeded permutation, and identified by content hash.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np

from ..checkpoint.paths import stat_regular
from ..errors import InputError, UsageError

TOKEN_SUFFIXES = (".tokens.npy", ".tokens.bin")
DEFAULT_TEXT_EXTS = (".txt", ".py", ".rst", ".md")
TEXT_FILE_CAP = 64 << 20  # bytes; a larger text file is refused rather than read
TOKEN_FILE_CAP = 1 << 30


@dataclass(frozen=True)
class Document:
    """One whole document: its token ids and where it came from."""

    name: str  # display name (path relative to the --data argument it came from)
    ids: np.ndarray  # [N] int64

    @property
    def key(self) -> str:
        """Content hash of the token ids: identifies the document across runs and machines."""
        return hashlib.sha256(np.ascontiguousarray(self.ids, dtype="<i8").tobytes()).hexdigest()[:16]


def _regular_file(path: str, cap: int) -> int:
    st = stat_regular(path, "data file")
    if st.st_size > cap:
        raise InputError(f"{path}: {st.st_size} bytes is larger than the {cap}-byte cap for one data file")
    return st.st_size


def is_token_file(path: str) -> bool:
    return path.endswith(TOKEN_SUFFIXES)


def list_data_files(paths: Sequence[str], exts: Sequence[str] = DEFAULT_TEXT_EXTS) -> List[tuple]:
    """(absolute path, display name) for every data file under ``paths``, in a deterministic order.

    A file given directly is always taken; inside folders, files whose name ends with one of ``exts``
    or a token suffix are taken (symlinked folders are not followed)."""
    if not paths:
        raise InputError("no --data given")
    out = []
    for p in paths:
        if os.path.isdir(p):
            root = os.path.abspath(p)
            label = os.path.basename(root.rstrip(os.sep)) or root
            found = []
            for d, _, files in os.walk(root):
                for f in files:
                    if f.endswith(tuple(exts)) or is_token_file(f):
                        full = os.path.join(d, f)
                        found.append((full, os.path.join(label, os.path.relpath(full, root))))
            out.extend(sorted(found, key=lambda x: x[1]))
        else:
            _regular_file(p, TOKEN_FILE_CAP)  # missing / FIFO / device refused here
            out.append((os.path.abspath(p), os.path.basename(p)))
    if not out:
        raise InputError(f"no data files found under {', '.join(map(str, paths))} (extensions: {', '.join(exts)})")
    return out


def read_token_file(path: str) -> np.ndarray:
    """Token ids of a pre-tokenized document (``.tokens.npy`` 1-D integer array or ``.tokens.bin`` int32)."""
    size = _regular_file(path, TOKEN_FILE_CAP)
    if path.endswith(".tokens.bin"):
        if size % 4:
            raise InputError(f"{path}: {size} bytes is not a whole number of int32 tokens")
        return np.fromfile(path, dtype="<i4").astype(np.int64)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy token array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InputError(f"{path}: expected a 1-D integer array of token ids, got {getattr(arr, 'dtype', '?')}"
                         f"{list(getattr(arr, 'shape', []))}")
    return arr.astype(np.int64)


def read_text_file(path: str) -> str:
    _regular_file(path, TEXT_FILE_CAP)
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = int(((ids < 0) | (ids >= vocab_size)).sum())
        raise InputError(f"{name}: {bad} token ids outside [0, {vocab_size}) (min {lo}, max {hi}); "
                         "was it tokenized for another model?")


def load_documents(paths: Sequence[str], vocab_size: int, tokenizer_factory: Optional[Callable] = None,
                   exts: Sequence[str] = DEFAULT_TEXT_EXTS, min_tokens: int = 2) -> List[Document]:
    """Read, tokenize and validate every document; refuse an empty dataset or out-of-range ids.

    ``tokenizer_factory()`` is called once, only if a text file is present (pre-tokenized data needs
    no tokenizer). Documents with fewer than ``min_tokens`` tokens are dropped."""
    tokenizer = None
    docs = []
    for path, name in list_data_files(paths, exts):
        if is_token_file(path):
            ids = read_token_file(path)
        else:
            if tokenizer is None:
                if tokenizer_factory is None:
                    raise InputError(f"{path}: a text file needs the model's tokenizer, and none is available")
                tokenizer = tokenizer_factory()
            ids = np.asarray(tokenizer.encode(read_text_file(path)), dtype=np.int64)
        check_ids(name, ids, vocab_size)
        if ids.size >= min_tokens:
            docs.append(Document(name, ids))
    if not docs:
        raise InputError(f"empty dataset: no document under {', '.join(map(str, paths))} has at least {min_tokens} tokens")
    return docs


def split_documents(docs: Sequence[Document], heldout_fraction: float, seed: int):
    """(train, heldout): a seeded permutation of documents; at least one held out when fraction > 0
    and there are two or more documents."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise UsageError(f"--heldout must be in [0, 1), got {heldout_fraction}")
    n = len(docs)
    k = int(round(n * heldout_fraction))
    if heldout_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    order = np.random.default_rng([seed, 0x5E1D]).permutation(n)
    held = set(int(i) for i in order[:k])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


class WindowSampler:
    """Training windows of ``seq_len`` tokens, each from one document, as a pure function of an index.

    Epoch e visits every window (documents cut at stride ``seq_len`` from a per-epoch jitter) in a
    seeded permutation; sample ``i`` is window ``perm_e[i mod n]`` with ``e = i // n``. The data cursor
    is therefore one integer, and resuming or sharding over ranks needs nothing else."""

    def __init__(self, docs: Sequence[Document], seq_len: int, seed: int):
        self.docs, self.seq_len, self.seed = list(docs), seq_len, seed
        self.counts = np.array([len(d.ids) // seq_len for d in self.docs], dtype=np.int64)
        self.total = int(self.counts.sum())
        if self.total == 0:
            longest = max((len(d.ids) for d in self.docs), default=0)
            raise InputError(f"no training document has --seq-len {seq_len} tokens (longest: {longest}); "
                             "lower --seq-len or add longer documents")
        self._epoch, self._cache = None, None

    def _epoch_plan(self, epoch: int):
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            jitter = [int(rng.integers(0, len(d.ids) - c * self.seq_len + 1)) for d, c in zip(self.docs, self.counts)]
            doc_of = np.repeat(np.arange(len(self.docs)), self.counts)
            first = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
            starts = [jitter[d] + (w - first[d]) * self.seq_len for w, d in enumerate(doc_of)]
            perm = rng.permutation(self.total)
            self._epoch, self._cache = epoch, (doc_of[perm], np.asarray(starts, dtype=np.int64)[perm])
        return self._cache

    def window(self, index: int) -> np.ndarray:
        doc_of, starts = self._epoch_plan(index // self.total)
        j = index % self.total
        s = int(starts[j])
        return self.docs[int(doc_of[j])].ids[s:s + self.seq_len]

    def batch(self, first_index: int, batch_size: int) -> np.ndarray:
        """[batch_size, seq_len] int64 of samples first_index .. first_index + batch_size - 1."""
        return np.stack([self.window(first_index + i) for i in range(batch_size)])
