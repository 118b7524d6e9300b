"""The one path policy for file names that come from files (index shard names, GGUF siblings).

A name must be a plain file name (no drive, root, UNC, ``..``, separators, NUL); its real path must
stay inside the model folder, except for the Hugging Face cache layout where
``snapshots/<rev>/x -> ../../blobs/<hash>``. Data files must be regular files: stat first (never
open a FIFO or device), open with O_NONBLOCK, then compare fstat with the stat.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import PurePosixPath, PureWindowsPath
from typing import Iterable, Tuple

from ..config import stat_regular  # noqa: F401 - the one regular-file check, re-exported here
from ..errors import InputError

NAME_MAX = 255


def short_repr(name, limit: int = 120) -> str:
    """repr() of a name from a file, cut to ``limit`` characters for messages."""
    r = repr(name)
    return r if len(r) <= limit else r[: limit - 12] + f"...' ({len(name)} chars)"


def check_plain_name(name, source: str, key: str) -> str:
    """Refuse anything but a plain file name; ``source``/``key`` say where the name came from."""
    bad = None
    if not isinstance(name, str) or not name:
        bad = "an empty or non-string file name"
    elif len(name) > NAME_MAX or any(ord(c) < 32 for c in name):
        bad = "an over-long name or control characters"
    else:
        win, posix = PureWindowsPath(name), PurePosixPath(name)
        if win.drive or win.root or posix.root:
            bad = "an absolute path, drive or UNC share"
        elif name in (".", "..") or ".." in win.parts or ".." in posix.parts:
            bad = "'..'"
        elif "/" in name or "\\" in name or win.name != name or posix.name != name:
            bad = "a path separator (only plain file names inside the model folder are allowed)"
    if bad:
        raise InputError(f"{source}: {key} -> {short_repr(name)} is refused: it contains {bad}")
    return name


def _hf_blobs_dir(folder_real: str):
    """``<repo>/blobs`` when ``folder_real`` is an HF cache snapshot ``<repo>/snapshots/<rev>``."""
    parent = os.path.dirname(folder_real)
    if os.path.basename(parent) == "snapshots":
        return os.path.join(os.path.dirname(parent), "blobs")
    return None


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve_in_folder(folder: str, name: str, source: str, key: str) -> str:
    """The real path of plain file ``name`` in ``folder``; refuses links leading outside the folder."""
    check_plain_name(name, source, key)
    folder_real = os.path.realpath(folder)
    real = os.path.realpath(os.path.join(folder_real, name))
    blobs = _hf_blobs_dir(folder_real)
    if _inside(real, folder_real) or (blobs is not None and _inside(real, os.path.realpath(blobs))):
        return real
    raise InputError(f"{source}: {key} -> {short_repr(name)} resolves outside the model folder ({real})")




def open_regular(path: str, what: str = "file") -> int:
    """An O_RDONLY fd of regular file ``path``: stat, then open its real path non-blocking and without
    following a link swapped in meanwhile, then fstat must match the stat."""
    st = stat_regular(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(os.path.realpath(path), flags)
    except OSError as e:
        raise InputError(f"{path}: cannot open {what} ({e.strerror})") from None
    fst = os.fstat(fd)
    if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise InputError(f"{path}: not a regular file ({what} changed while opening)")
    return fd


def pread_exact(fd: int, n: int, offset: int, path: str) -> bytearray:
    """Read exactly ``n`` bytes at ``offset`` into a fresh buffer; InputError if the file ends early."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.preadv(fd, [view[got:got + (1 << 30)]], offset + got)
        if k <= 0:
            raise InputError(f"{path}: corrupt or truncated: file ended at byte {offset + got}, expected {offset + n}")
        got += k
    return buf


SAMPLE_BLOCK = 4096  # bytes read at each of a tensor's three sample points (``sampled_digest``)


def sampled_digest(fd: int, extents: Iterable[Tuple[str, int, int]], path: str) -> str:
    """sha256 over each (name, start, end) of ``extents`` and up to three ``SAMPLE_BLOCK``-byte blocks of its bytes
    [start, end): the first, the middle and the last (the whole range when it is shorter than three blocks).

    Part of a checkpoint's fingerprint: a model whose values changed under the same headers (a fine-tune of the same
    shapes) rewrites every block of the tensors it changed, so it gets another digest, for three small reads a tensor."""
    h = hashlib.sha256()
    for name, start, end in extents:
        n = end - start
        if n <= 3 * SAMPLE_BLOCK:
            offsets = [start] if n > 0 else []
            size = n
        else:
            offsets = [start, start + (n - SAMPLE_BLOCK) // 2, end - SAMPLE_BLOCK]
            size = SAMPLE_BLOCK
        h.update(f"{name}\0{start}\0{end}\0".encode())
        for off in offsets:
            h.update(pread_exact(fd, size, off, path))
    return h.hexdigest()
