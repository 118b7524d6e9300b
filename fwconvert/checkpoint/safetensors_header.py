"""Our own strict reader of safetensors headers (8-byte little-endian length + JSON), data untouched.

Checks what safetensors leaves to the caller or that we want named in our own words: header caps,
strict JSON (duplicate keys, NaN), the dtype allowlist, shape x dtype == byte range with Python
ints, offsets contiguous from 0 with no overlap, no gap, no trailing bytes and nothing past the end.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, Tuple

from ..config import parse_json_strict
from ..errors import InputError
from .paths import open_regular, pread_exact, short_repr

HEADER_CAP = 100 * 1000 * 1000  # bytes of header JSON (safetensors' own limit)
MAX_RANK = 8
MAX_NUMEL = 1 << 40
ALLOWED_DTYPES = ("BF16", "F16", "F32")  # weights we load
KNOWN_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1,
                "F6_E3M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8, "C64": 8}
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: shape, dtype and absolute byte range in the file."""

    shape: Tuple[int, ...]
    dtype: str
    start: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    size: int
    tensors: Dict[str, TensorEntry]
    metadata: Dict[str, str]
    digest: str  # sha256 of the 8-byte length + header JSON
    ino: Tuple[int, int]  # (st_dev, st_ino) when the header was read


def _corrupt(path: str, why: str) -> InputError:
    return InputError(f"{path}: corrupt or truncated safetensors file: {why}")


def _parse_entry(path: str, name: str, e, data_start: int) -> TensorEntry:
    rn = short_repr(name)
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"{path}: invalid header: tensor {rn} must have exactly dtype, shape, data_offsets")
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if dtype not in ALLOWED_DTYPES:
        kind = "unsupported" if dtype in KNOWN_DTYPES else "unknown"
        raise InputError(f"{path}: tensor {rn} has {kind} dtype {short_repr(dtype, 40)} "
                         f"(allowed for weights: {', '.join(ALLOWED_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or \
            any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise InputError(f"{path}: invalid header: tensor {rn} shape {short_repr(shape, 80)} is not a list of "
                         f"at most {MAX_RANK} non-negative integers")
    if not isinstance(offs, list) or len(offs) != 2 or \
            any(isinstance(o, bool) or not isinstance(o, int) or o < 0 for o in offs) or offs[0] > offs[1]:
        raise _corrupt(path, f"tensor {rn} has invalid data_offsets {short_repr(offs, 80)}")
    numel = 1
    for s in shape:
        numel *= s
        if numel > MAX_NUMEL:
            raise _corrupt(path, f"tensor {rn} shape {shape} has more than 2**40 elements (overflow)")
    nbytes = numel * ITEMSIZE[dtype]
    if nbytes != offs[1] - offs[0]:
        raise _corrupt(path, f"tensor {rn}: shape {shape} x {dtype} is {nbytes} bytes but its byte range "
                             f"{offs} holds {offs[1] - offs[0]}")
    return TensorEntry(tuple(shape), dtype, data_start + offs[0], data_start + offs[1])


def _check_layout(path: str, tensors: Dict[str, TensorEntry], data_start: int, size: int) -> None:
    """Byte ranges must tile [data_start, size) exactly: contiguous, no overlap, no gap, no trailing bytes."""
    pos = data_start
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start < pos:
            raise _corrupt(path, f"tensor {short_repr(name)} overlaps the previous tensor (offset "
                                 f"{t.start - data_start} < {pos - data_start})")
        if t.start > pos:
            raise _corrupt(path, f"gap of {t.start - pos} bytes before tensor {short_repr(name)}")
        pos = t.end
    if pos > size:
        raise _corrupt(path, f"data needs {pos} bytes but the file has {size} (truncated)")
    if pos < size:
        raise _corrupt(path, f"{size - pos} trailing bytes after the last tensor")


def _parse_metadata(path: str, meta) -> Dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InputError(f"{path}: invalid header: __metadata__ must map strings to strings")
    return dict(meta)


def read_header(path: str) -> SafetensorsHeader:
    """Read and fully validate the header of safetensors file ``path`` (no tensor data is read)."""
    fd = open_regular(path, "safetensors file")
    try:
        st = os.fstat(fd)
        size = st.st_size
        if size < 8:
            raise InputError(f"{path}: invalid safetensors file: header too small ({size} bytes)")
        n = int.from_bytes(pread_exact(fd, 8, 0, path), "little")
        if n > HEADER_CAP:
            raise InputError(f"{path}: invalid safetensors file: header too large ({n} bytes > {HEADER_CAP})")
        if n < 2 or 8 + n > size:
            raise InputError(f"{path}: invalid safetensors file: invalid header length {n} (file has {size} bytes)")
        raw = bytes(pread_exact(fd, n, 8, path))
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: invalid safetensors header: not UTF-8 (byte {e.start})") from None
    doc = parse_json_strict(text, f"{path} (safetensors header)")
    if not isinstance(doc, dict):
        raise InputError(f"{path}: invalid safetensors header: not a JSON object")
    meta = _parse_metadata(path, doc.pop("__metadata__", None))
    tensors = {name: _parse_entry(path, name, e, 8 + n) for name, e in doc.items()}
    _check_layout(path, tensors, 8 + n, size)
    digest = hashlib.sha256(n.to_bytes(8, "little") + raw).hexdigest()
    return SafetensorsHeader(path, size, tensors, meta, digest, (st.st_dev, st.st_ino))
