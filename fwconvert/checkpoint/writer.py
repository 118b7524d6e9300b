"""Atomic output folders: preflight refusals, a sibling staging folder, O_EXCL files, MANIFEST.json last.

``preflight`` refuses unsafe outputs before any heavy work; ``AtomicOutput`` stages every file in
``.<name>.fwconvert-partial-<pid>-<rand>`` beside the output, fsyncs, writes ``MANIFEST.json`` last and
renames the folder into place (with ``force``, the old output is swapped out and only then deleted).
``ShardedSafetensorsWriter`` (now in ``shards.py``, re-exported here) streams tensors into safetensors shards
(+ index) in any arrival order; ``resume.py`` adds the staging journal behind ``--resume``.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import sys
from typing import Optional

from ..errors import OutputError, ResourceError

log = logging.getLogger("fwconvert")

PARTIAL_TAG = ".fwconvert-partial-"
OLD_TAG = ".fwconvert-old-"
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "fwconvert-manifest/1"
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def faults() -> dict:
    """Fault-injection hooks for tests: ``FWCONVERT_FAULT=kind:arg[,kind:arg]``, read only when FWCONVERT_TESTING=1."""
    if os.environ.get("FWCONVERT_TESTING") != "1":
        return {}
    out = {}
    for item in os.environ.get("FWCONVERT_FAULT", "").split(","):
        if ":" in item:
            k, v = item.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def _split_out(out) -> tuple:
    out = os.path.abspath(os.fspath(out))
    parent, name = os.path.split(out.rstrip(os.sep) or out)
    if not name or name in (".", ".."):
        raise OutputError(f"{out}: not a usable output folder name")
    return os.path.join(parent, name), parent, name


def leftovers(out, tags=(PARTIAL_TAG, OLD_TAG)) -> list:
    """Staging / set-aside folders of earlier interrupted runs next to ``out`` (named ``.<name><tag>...``)."""
    _, parent, name = _split_out(out)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    prefixes = tuple(f".{name}{t}" for t in tags)
    return sorted(os.path.join(parent, e) for e in entries if e.startswith(prefixes))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _check_overlap(out_real: str, inputs) -> None:
    for inp in inputs:
        if inp is None:
            continue
        real = os.path.realpath(os.fspath(inp))
        is_dir = os.path.isdir(real)
        if out_real == real or _inside(real, out_real) or (is_dir and _inside(out_real, real)):
            raise OutputError(f"{out_real}: output overlaps input {real}; choose an output outside the input")


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        up = os.path.dirname(path)
        if up == path:
            break
        path = up
    return path


def _probe_writable(parent: str) -> None:
    probe = os.path.join(parent, f".fwconvert-probe-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(probe, _OPEN_FLAGS, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ResourceError(f"{parent}: output folder is not writable ({e.strerror})") from None


def check_disk(path: str, need: int, what=None) -> None:
    """Refuse (exit 5) when the filesystem holding ``path`` has less than ``need`` bytes free; the message
    names ``what`` (default: ``path``)."""
    free = shutil.disk_usage(_nearest_existing(path)).free
    if need > free:
        raise ResourceError(f"{what or path}: not enough disk space: {need} bytes needed, {free} bytes free")


def not_an_earlier_output(out: str, manifest: str = MANIFEST_NAME, is_ours=None,
                          kind: str = "fwconvert output") -> Optional[str]:
    """Why ``--force`` must not replace the existing folder ``out``, or None: an empty folder, or one whose regular
    ``manifest`` file is a JSON object that ``is_ours`` accepts (default: this writer's MANIFEST.json format, an
    earlier add-fwl / mark-fast / calibrate output), may go. Anything else may be the user's own data (a mistyped
    ``-o``). ``kind`` names such an output in the message."""
    lead = f"--force replaces only an empty folder or an earlier {kind}, and this folder"
    try:
        entries = os.listdir(out)
    except OSError as e:
        return f"{lead} cannot be listed ({e.strerror})"
    if not entries:
        return None
    path = os.path.join(out, manifest)
    if not os.path.isfile(path) or os.path.islink(path):
        return f"{lead} has no {manifest} (it is not an {kind})"
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
    except (OSError, ValueError):
        body = None
    ours = is_ours or (lambda b: b.get("format") == MANIFEST_FORMAT)
    if not isinstance(body, dict) or not ours(body):
        return f"{lead} has a {manifest} that is not an {kind}'s"
    return None


def preflight(out, inputs=(), force=False, estimate_bytes=0, report_leftovers=True, replaceable=None) -> str:
    """Refuse an unsafe output before heavy work; returns the absolute output path.

    Refusals: out exists without ``force`` or is not a folder (4), or ``replaceable(out)`` gives a reason not to
    replace that folder (4; e.g. it is not an earlier output of the command), is a symlink (4), overlaps an input (4);
    the parent is not writable (5); free disk below ``estimate_bytes`` (5). Leftovers are reported."""
    out, parent, name = _split_out(out)
    if os.path.islink(out):
        raise OutputError(f"{out}: output path is a symbolic link; refusing to write through it")
    pdir = os.path.realpath(parent)
    _check_overlap(os.path.join(pdir, name), inputs)
    if os.path.lexists(out):
        if not force:
            raise OutputError(f"{out}: output already exists; use --force to replace it")
        if not stat.S_ISDIR(os.lstat(out).st_mode):
            raise OutputError(f"{out}: output exists and is not a folder; remove it yourself")
        why = replaceable(out) if replaceable is not None else None
        if why:
            raise OutputError(f"{out}: {why}; choose another output folder or remove it yourself")
    existing = _nearest_existing(pdir)
    if not os.path.isdir(existing):
        raise OutputError(f"{parent}: parent of the output is not a folder")
    check_disk(existing, int(estimate_bytes), out)  # before anything (a missing parent folder) is created
    if existing != pdir:
        try:
            os.makedirs(pdir, exist_ok=True)
        except OSError as e:
            raise ResourceError(f"{parent}: cannot create the output's parent folder ({e.strerror})") from None
    _probe_writable(pdir)
    for p in leftovers(out) if report_leftovers else ():
        log.warning("Warning: leftover from an earlier interrupted run: %s (not reused; delete it when done)", p)
    return out


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_name(name: str) -> str:
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise OutputError(f"refusing to write a file named {name!r}: only plain file names are allowed")
    return name


class HashingFile:
    """A write-only file created with O_EXCL|O_NOFOLLOW that hashes what it writes and fsyncs on close."""

    def __init__(self, path: str, owner: "AtomicOutput"):
        self.path, self.owner = path, owner
        self._fd = os.open(path, (_OPEN_FLAGS & ~os.O_WRONLY) | os.O_RDWR, 0o644)
        self.closed = False
        self.sha = hashlib.sha256()
        self.size = 0
        self._enospc = faults().get("enospc_at") == os.path.basename(path)

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        self.sha.update(mv)
        self._raw_write(mv, self.size)
        self.size += len(mv)
        return len(mv)

    def pwrite_unhashed(self, data, offset: int) -> None:
        """Write at ``offset`` without hashing (used by writers that fill a reserved header; rehash on close)."""
        self._raw_write(memoryview(data).cast("B"), offset)

    def _raw_write(self, mv, offset: int) -> None:
        try:
            if self._enospc:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
            done = 0
            while done < len(mv):
                done += os.pwrite(self._fd, mv[done:], offset + done)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self.owner.raise_no_space(self.path)
            raise

    def close(self, rehash: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            os.fsync(self._fd)
            if rehash:
                self.sha = hashlib.sha256()
                for off in range(0, self.size, 1 << 22):
                    self.sha.update(os.pread(self._fd, min(1 << 22, self.size - off), off))
        finally:
            os.close(self._fd)
        self.owner.files[os.path.basename(self.path)] = {"sha256": self.sha.hexdigest(), "size": self.size}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _versions() -> dict:
    from .. import __version__

    out = {"fwconvert": __version__, "python": sys.version.split()[0]}
    for mod in ("torch", "safetensors", "transformers", "onnx", "onnxruntime"):
        m = sys.modules.get(mod)
        if m is not None and getattr(m, "__version__", None):
            out[mod] = m.__version__
    return out


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """Linux renameat2 (1 = RENAME_NOREPLACE, 2 = RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(src), -100, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    if err == errno.EEXIST:
        raise OutputError(f"{dst}: output appeared while writing; use --force to replace it")
    raise OSError(err, os.strerror(err), dst)


class AtomicOutput:
    """Context manager: stage files beside ``out``, then publish the folder atomically with MANIFEST.json last.

    Usage::

        with AtomicOutput(out, force=force, inputs=[src]) as ao:
            with ao.open("model.safetensors") as f: f.write(data)
            ao.write_json("config.json", cfg)
            ao.manifest.update(input_fingerprint=..., flags=...)

    On any exception (KeyboardInterrupt and other BaseExceptions included) the staging folder is removed
    and the previous output, if any, is untouched."""

    def __init__(self, out, force: bool = False, inputs=(), estimate_bytes: int = 0, preflighted: bool = False):
        self.force, self.inputs, self.estimate_bytes = force, tuple(inputs), int(estimate_bytes)
        self.preflighted = preflighted  # the caller ran preflight() already: re-check, but report leftovers once
        self.out, self.parent, self.name = _split_out(out)
        self.staging = None
        self.files: dict = {}
        self.manifest: dict = {}
        self._open: list = []

    # -- staging ---------------------------------------------------------------------------------
    def __enter__(self) -> "AtomicOutput":
        self.out = preflight(self.out, self.inputs, self.force, self.estimate_bytes, not self.preflighted)
        self.parent = os.path.dirname(self.out)
        try:
            self.staging = self._new_staging()
        except OSError as e:  # e.g. the disk filled since preflight (resume.py's journal has no file name)
            err = self._no_space(e)
            if err is not None:
                raise err from e
            raise
        return self

    def _new_staging(self) -> str:
        """Create this run's staging folder (``resume.ResumableOutput`` may adopt a leftover one instead)."""
        staging = os.path.join(self.parent, f".{self.name}{PARTIAL_TAG}{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(staging, 0o755)
        return staging

    def path(self, name: str) -> str:
        return os.path.join(self.staging, _plain_name(name))

    def open(self, name: str) -> HashingFile:
        if name in self.files or name == MANIFEST_NAME:
            raise OutputError(f"{name!r} is written twice into {self.out}")
        f = HashingFile(self.path(name), self)
        self._open.append(f)
        return f

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open(name) as f:
            f.write(data)

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))

    def copy_file(self, name: str, src: str) -> None:
        """Copy a regular file (e.g. a tokenizer file) into the output under the plain name ``name``."""
        with open(src, "rb") as fin:
            if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
                raise OutputError(f"{src}: not a regular file; not copied")
            with self.open(name) as f:
                for block in iter(lambda: fin.read(1 << 22), b""):
                    f.write(block)

    def raise_no_space(self, path: str) -> None:
        free = shutil.disk_usage(self.parent).free
        written = sum(v["size"] for v in self.files.values()) + sum(f.size for f in self._open if not f.closed)
        need = max(self.estimate_bytes - written, 0)
        raise ResourceError(f"{path}: no space left on device ({need} more bytes needed, {free} bytes free)")

    def _no_space(self, e: BaseException):
        """The ResourceError of ``raise_no_space`` for an ENOSPC/EDQUOT OSError raised outside ``HashingFile``
        (a journal, an exporter writing into the staging folder, fsync); None for anything else."""
        if not isinstance(e, OSError) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return None
        try:
            self.raise_no_space(e.filename2 or e.filename or self.staging or self.out)
        except ResourceError as err:
            return err

    # -- publish ---------------------------------------------------------------------------------
    def _adopt_untracked(self) -> None:
        """Hash and fsync files other writers put into the staging folder (e.g. an ONNX exporter)."""
        for root, dirs, names in os.walk(self.staging):
            dirs.sort()
            for n in sorted(names):
                p = os.path.join(root, n)
                rel = os.path.relpath(p, self.staging).replace(os.sep, "/")
                if rel in self.files:
                    continue
                if rel == MANIFEST_NAME or os.path.islink(p) or not os.path.isfile(p):
                    raise OutputError(f"{p}: unexpected entry in the staging folder")
                sha, size = hashlib.sha256(), 0
                fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                try:
                    os.fsync(fd)
                    for block in iter(lambda: os.read(fd, 1 << 22), b""):
                        sha.update(block)
                        size += len(block)
                finally:
                    os.close(fd)
                self.files[rel] = {"sha256": sha.hexdigest(), "size": size}
            if root != self.staging:
                fsync_dir(root)

    def _write_manifest(self) -> None:
        body = {"format": MANIFEST_FORMAT}
        body.update({k: v for k, v in self.manifest.items() if k not in ("format", "files")})
        if "flags" in body:
            body["flags_sha256"] = hashlib.sha256(json.dumps(body["flags"], sort_keys=True).encode()).hexdigest()
        body.setdefault("versions", _versions())
        body["files"] = {k: self.files[k] for k in sorted(self.files)}
        f = HashingFile(self.path(MANIFEST_NAME), self)
        try:
            f.write((json.dumps(body, indent=2) + "\n").encode("utf-8"))
        finally:
            f.close()
        self.files.pop(MANIFEST_NAME, None)

    def _publish(self) -> None:
        if os.path.islink(self.out):
            raise OutputError(f"{self.out}: output path became a symbolic link; refusing to replace it")
        if os.path.lexists(self.out):
            if not self.force:
                raise OutputError(f"{self.out}: output already exists; use --force to replace it")
            if _renameat2(self.staging, self.out, 2):  # exchange: the old output now sits in staging
                fsync_dir(self.parent)
                shutil.rmtree(self.staging, ignore_errors=True)
                return
            aside = os.path.join(self.parent, f".{self.name}{OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(self.out, aside)
            try:
                os.rename(self.staging, self.out)
            except BaseException:
                os.rename(aside, self.out)
                raise
            fsync_dir(self.parent)
            shutil.rmtree(aside, ignore_errors=True)
            return
        if not _renameat2(self.staging, self.out, 1):
            os.rename(self.staging, self.out)
        fsync_dir(self.parent)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                for f in self._open:
                    f.close()
                self._adopt_untracked()
                self._write_manifest()
                fsync_dir(self.staging)
                self._publish()
                self.staging = None
                return False
        except BaseException as e:
            err = self._no_space(e)  # measured before the staging folder is removed
            self._cleanup()
            if err is not None:
                raise err from e
            raise
        err = self._no_space(exc)
        self._cleanup()
        if err is not None:
            raise err from exc
        return False

    def _cleanup(self) -> None:
        for f in self._open:
            if not f.closed:
                try:
                    os.close(f._fd)
                except OSError:
                    pass
                f.closed = True
        if self.staging and os.path.isdir(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None


# -- re-exports -----------------------------------------------------------------------------------
_SHARD_NAMES = ("ST_DTYPES", "DEFAULT_SHARD_BYTES", "st_dtype", "tensor_bytes", "write_safetensors",
                "ShardedSafetensorsWriter")


def __getattr__(name):
    """The safetensors writers moved to ``shards.py``; imported lazily (shards.py imports this module)."""
    if name in _SHARD_NAMES:
        from . import shards

        return getattr(shards, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
