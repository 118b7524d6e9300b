"""safetensors weights: one file, or shards listed by ``model.safetensors.index.json``.

Header-only preflight: every shard name passes the path policy, every header is validated, and the
index must agree with the headers (each tensor in exactly the shard the index names; total_size).
Data is then read one tensor at a time with ``pread`` from a verified regular-file descriptor.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Iterator, List, Optional, Tuple

from ..config import load_json_strict
from ..errors import InputError
from .paths import open_regular, pread_exact, resolve_in_folder, sampled_digest, short_repr, stat_regular
from .safetensors_header import SafetensorsHeader, TensorEntry, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
INDEX_CAP = 64 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_REFUSAL = "pickle checkpoints are not loaded by default (convert them to safetensors first)"


def _problems(source: str, items: List[str], what: str) -> InputError:
    more = f"\n(+{len(items) - 20} more)" if len(items) > 20 else ""
    return InputError(f"{source}: {len(items)} {what}:\n" + "\n".join(items[:20]) + more)


def read_index(folder: str, index_path: str) -> Tuple[Dict[str, str], Optional[int]]:
    """weight_map (tensor -> real shard path) and metadata.total_size from a safetensors index."""
    doc = load_json_strict(index_path, cap=INDEX_CAP)
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise InputError(f"{index_path}: field 'weight_map' must be a non-empty object")
    out, resolved = {}, {}
    for name, shard in wm.items():
        key = f"weight_map[{short_repr(name)}]"
        if not isinstance(shard, str):
            raise InputError(f"{index_path}: {key} -> {short_repr(shard)} is not a file name")
        if shard not in resolved:
            real = resolve_in_folder(folder, shard, index_path, key)
            if shard.lower().endswith(PICKLE_SUFFIXES):
                raise InputError(f"{index_path}: {key} -> {short_repr(shard)}: {PICKLE_REFUSAL}")
            if not shard.endswith(".safetensors"):
                raise InputError(f"{index_path}: {key} -> {short_repr(shard)} is not a .safetensors file")
            resolved[shard] = real
        out[name] = resolved[shard]
    meta = doc.get("metadata") or {}
    total = meta.get("total_size") if isinstance(meta, dict) else None
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
        raise InputError(f"{index_path}: metadata.total_size must be a non-negative integer, got {total!r}")
    return out, total


def _check_index_vs_headers(index_path: str, wm: Dict[str, str], headers: Dict[str, SafetensorsHeader],
                            total: Optional[int]) -> None:
    """The index and the shard headers must agree exactly; all disagreements in one error."""
    problems, where = [], {}
    for path, h in headers.items():
        for name in h.tensors:
            if name in where:
                problems.append(f"tensor {short_repr(name)} is in two shards: {where[name]} and {path}")
            where[name] = path
    for name, path in wm.items():
        if name not in headers[path].tensors:
            problems.append(f"shard {path} lacks tensor {short_repr(name)} that the index assigns to it")
    for path, h in headers.items():
        for name in h.tensors:
            if name not in wm:
                problems.append(f"shard {path} holds tensor {short_repr(name)} that the index does not mention")
            elif wm[name] != path:
                problems.append(f"shard {path} holds tensor {short_repr(name)} that the index assigns to {wm[name]}")
    if problems:
        raise _problems(index_path, problems, "inconsistencies between the index and the shards")
    nbytes = sum(t.end - t.start for h in headers.values() for t in h.tensors.values())
    if total is not None and total != nbytes:
        raise InputError(f"{index_path}: metadata.total_size is {total} but the shards hold {nbytes} bytes of tensors")


class SafetensorsWeights:
    """The tensors of one or more safetensors files, validated header-only."""

    def __init__(self, headers: Dict[str, SafetensorsHeader], index_path: Optional[str] = None):
        self.headers = headers
        self.index_path = index_path
        self.location: Dict[str, str] = {n: p for p, h in headers.items() for n in h.tensors}

    @classmethod
    def from_index(cls, folder: str, index_path: str) -> "SafetensorsWeights":
        stat_regular(index_path, "safetensors index")
        wm, total = read_index(folder, index_path)
        headers = {}
        for path in sorted(set(wm.values())):
            headers[path] = read_header(path)
        _check_index_vs_headers(index_path, wm, headers, total)
        return cls(headers, index_path)

    @classmethod
    def from_file(cls, path: str) -> "SafetensorsWeights":
        return cls({os.path.realpath(path): read_header(path)})

    @property
    def data_files(self) -> List[str]:
        return list(self.headers)

    def specs(self) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        return {n: (t.shape, t.dtype) for h in self.headers.values() for n, t in h.tensors.items()}

    def fingerprint_parts(self) -> List[bytes]:
        parts = []
        if self.index_path:
            with open(self.index_path, "rb") as f:
                parts.append(hashlib.sha256(f.read(INDEX_CAP + 1)).digest())
        for path, h in self.headers.items():
            parts.append(f"{os.path.basename(path)}:{h.size}:{h.digest}".encode())
        return parts

    def sample_parts(self) -> List[bytes]:
        """Per shard, ``sampled_digest`` over its tensors (by name)."""
        parts = []
        for path, h in self.headers.items():
            fd = self._open_checked(path, h)
            try:
                parts.append(sampled_digest(fd, sorted((n, t.start, t.end) for n, t in h.tensors.items()), path).encode())
            finally:
                os.close(fd)
        return parts

    @staticmethod
    def _open_checked(path: str, h: SafetensorsHeader) -> int:
        """A read-only fd of shard ``path``, refused if it is no longer the file whose header ``h`` was read."""
        fd = open_regular(path, "safetensors shard")
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != h.ino or st.st_size != h.size:
            os.close(fd)
            raise InputError(f"{path}: the file changed since its header was checked")
        return fd

    def iter_tensors(self, names=None) -> Iterator[Tuple[str, "object"]]:
        """(name, torch tensor) for the wanted names, shard by shard, tensor by tensor in file order."""
        wanted = None if names is None else set(names)
        unknown = sorted(wanted - set(self.location)) if wanted is not None else []
        if unknown:
            raise InputError(f"checkpoint has no tensor(s) {', '.join(short_repr(n) for n in unknown[:20])}")
        for path, h in self.headers.items():
            entries = [(n, t) for n, t in sorted(h.tensors.items(), key=lambda kv: kv[1].start)
                       if wanted is None or n in wanted]
            if not entries:
                continue
            fd = self._open_checked(path, h)
            try:
                for name, entry in entries:
                    yield name, _read_tensor(fd, entry, path)
            finally:
                os.close(fd)


def _read_tensor(fd: int, e: TensorEntry, path: str):
    import torch

    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[e.dtype]
    if e.end == e.start:
        return torch.empty(e.shape, dtype=dtype)
    buf = pread_exact(fd, e.end - e.start, e.start, path)
    return torch.frombuffer(buf, dtype=dtype).reshape(e.shape)
