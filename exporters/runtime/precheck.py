"""Refuse hostile or broken exported graphs before onnx or onnxruntime open them.

A small protobuf wire-format walk (no onnx import) over ModelProto -> graphs / functions / attribute
tensors finds every tensor with external data and checks its location (a plain file name inside the
folder, a regular file that is neither a symlink nor hard-linked), keys, offset and length (inside the
file, equal to the tensor's size), and the model's IR version. Data files are only ``lstat``-ed.
"""
from __future__ import annotations

import os
import stat
from typing import Iterator, Tuple

from fwconvert.errors import InputError

MAX_IR_VERSION = 13  # onnxruntime 1.31 loads IR <= 13 (onnx 1.23 writes 14 unless pinned)
MAX_GRAPH_BYTES = (2 << 30) - 1  # a protobuf message cannot be larger
EXTERNAL_KEYS = {"location", "offset", "length", "checksum"}
# TensorProto.DataType -> bytes per element (strings and sub-byte types are not size-checked)
ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
                 17: 1, 18: 1, 19: 1, 20: 1}


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, i: int, end: int) -> Tuple[int, int]:
    shift = value = 0
    while True:
        if i >= end or shift > 63:
            raise _Malformed("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[Tuple[int, int, object]]:
    """(field number, wire type, int value or (start, end) span) for each field of one message."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise _Malformed("field number 0")
        if wt == 0:
            value, i = _varint(buf, i, end)
        elif wt == 1 or wt == 5:
            n = 8 if wt == 1 else 4
            if i + n > end:
                raise _Malformed("truncated fixed field")
            value, i = None, i + n
        elif wt == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise _Malformed("length-delimited field runs past its message")
            value, i = (i, i + n), i + n
        else:
            raise _Malformed(f"unsupported wire type {wt}")
        yield num, wt, value


def _sub(buf, fields, num) -> Iterator[Tuple[int, int]]:
    for n, wt, v in fields:
        if n == num and wt == 2:
            yield v


def _text(buf: memoryview, span) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("a string field is not UTF-8") from None


def _tensor_info(buf, span):
    """(name, dims, data_type, {external key: value}, data_location) of one TensorProto."""
    name, dims, dtype, ext, loc = "", [], 0, {}, 0
    for num, wt, v in _fields(buf, *span):
        if num == 1 and wt == 0:
            dims.append(v)
        elif num == 1 and wt == 2:
            i = v[0]
            while i < v[1]:
                d, i = _varint(buf, i, v[1])
                dims.append(d)
        elif num == 2 and wt == 0:
            dtype = v
        elif num == 8 and wt == 2:
            name = _text(buf, v)
        elif num == 14 and wt == 0:
            loc = v
        elif num == 13 and wt == 2:
            entry = {n: _text(buf, s) for n, w, s in _fields(buf, *v) if w == 2}
            key = entry.get(1, "")
            if key in ext:
                raise _Malformed(f"tensor {name!r}: external_data key {key!r} given twice")
            ext[key] = entry.get(2, "")
    return name, dims, dtype, ext, loc


def _tensors(buf, span, kind: str, depth: int) -> Iterator[Tuple[int, int]]:
    """Every TensorProto span reachable from a message of ``kind`` (model, graph, node, attr, sparse, function)."""
    if depth > 64:
        raise _Malformed("messages nested too deeply")
    children = {
        "model": {7: "graph", 20: "training", 25: "function"},
        "training": {1: "graph", 2: "graph"},
        "graph": {1: "node", 5: "tensor", 15: "sparse"},
        "function": {7: "node"},
        "node": {5: "attr"},
        "attr": {5: "tensor", 6: "graph", 22: "sparse", 10: "tensor", 11: "graph", 23: "sparse"},
        "sparse": {1: "tensor", 2: "tensor"},
    }[kind]
    for num, wt, v in _fields(buf, *span):
        child = children.get(num)
        if child is None or wt != 2:
            continue
        if child == "tensor":
            yield v
        else:
            yield from _tensors(buf, v, child, depth + 1)


def _check_external(folder: str, name: str, dims, dtype: int, ext: dict) -> None:
    where = f"tensor {name!r}"
    unknown = sorted(set(ext) - EXTERNAL_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown external_data keys {unknown} (allowed: {sorted(EXTERNAL_KEYS)})")
    loc = ext.get("location")
    if not loc:
        raise InputError(f"{where}: external data without a location")
    if loc in (".", "..") or "/" in loc or "\\" in loc or "\x00" in loc or os.path.isabs(loc):
        raise InputError(f"{where}: external data location {loc!r} is not a plain file name inside {folder}")
    path = os.path.join(folder, loc)
    try:
        st = os.lstat(path)
    except OSError:
        raise InputError(f"{where}: external data file {path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise InputError(f"{where}: external data file {path} is a symbolic link; refusing to follow it")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{where}: external data file {path} is not a regular file")
    if st.st_nlink > 1:
        raise InputError(f"{where}: external data file {path} is hard-linked ({st.st_nlink} links); refusing it")
    try:
        offset = int(ext.get("offset", "0"))
        length = int(ext["length"]) if "length" in ext else st.st_size - offset
    except ValueError:
        raise InputError(f"{where}: external data offset/length are not integers: {ext}") from None
    if offset < 0 or length < 0 or offset + length > st.st_size:
        raise InputError(f"{where}: external data offset {offset} + length {length} runs past the end of "
                         f"{loc} ({st.st_size} bytes)")
    if dtype in ELEMENT_BYTES:
        n = ELEMENT_BYTES[dtype]
        for d in dims:
            n *= d
        if n != length:
            raise InputError(f"{where}: external data length {length} does not match its shape {dims} ({n} bytes)")


def _read_graph(path: str) -> bytes:
    try:
        st = os.lstat(path)
    except OSError:
        raise InputError(f"{path}: graph file not found") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file (symlinks, FIFOs and devices are refused)")
    if st.st_size == 0:
        raise InputError(f"{path}: empty file (an interrupted export?)")
    if st.st_size > MAX_GRAPH_BYTES:
        raise InputError(f"{path}: {st.st_size} bytes is larger than a protobuf can be")
    with open(path, "rb") as f:
        return f.read()


def ort_version() -> str:
    from importlib import metadata

    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def check_graph_file(path: str) -> int:
    """Validate the graph at ``path`` and everything it references; returns its IR version."""
    folder = os.path.dirname(os.path.abspath(path))
    buf = memoryview(_read_graph(path))
    try:
        top = list(_fields(buf, 0, len(buf)))
        ir = next((v for n, wt, v in top if n == 1 and wt == 0), None)
        if ir is None or not any(n == 7 and wt == 2 for n, wt, v in top):
            raise _Malformed("no ir_version or no graph")
        infos = [_tensor_info(buf, span) for span in _tensors(buf, (0, len(buf)), "model", 0)]
    except _Malformed as e:
        raise InputError(f"{path}: not a valid ONNX model ({e})") from None
    if ir > MAX_IR_VERSION:
        raise InputError(f"{path}: IR version {ir} is newer than onnxruntime {ort_version()} supports "
                         f"(IR version <= {MAX_IR_VERSION}); re-export with fwconvert export-onnx")
    for name, dims, dtype, ext, loc in infos:
        if loc == 1 or ext:
            _check_external(folder, name, dims, dtype, ext)
    return ir
