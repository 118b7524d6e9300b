"""``--resume`` of an interrupted conversion: a journal in the staging folder, shards kept by sha256.

A conversion stages into ``.<out>.fwconvert-partial-<pid>-<rand>`` beside ``out`` (``writer.AtomicOutput``).
``ResumableOutput`` keeps a journal there, ``.fwconvert-journal.json``::

    {"format": "fwconvert-resume/1", "output": "/abs/out",
     "identity": {"versions": {"fwconvert": "0.1.0", "torch": "2.x"}, "input_fingerprint": "<sha256>",
                  "flags": {...the conversion parameters...}, "layout_sha256": "<tensor plan + max shard size>"},
     "shards": {"model-00001-of-00004.safetensors": {"sha256": "...", "size": 123, "data_bytes": 100}, ...},
     "checksum": "<sha256 of the canonical JSON of everything above>"}

It is written when the staging folder is created and again each time a shard is complete and fsynced: written
to ``.fwconvert-journal.json.tmp`` (O_EXCL|O_NOFOLLOW), fsynced, renamed over the journal, folder fsynced. So a
crash never leaves it torn, and it lists only shards whose bytes are on disk. It is deleted before the folder
is published: a resumed output and an uninterrupted one hold the same files, bit for bit.

With ``resume=True``:

- candidates are the leftover staging folders of the same output that are real folders owned by this user,
  hold a journal and are not locked by a running conversion (each ``ResumableOutput`` holds ``flock`` on its
  staging folder while it runs);
- a journal that cannot be read or trusted (not a regular file, bad JSON, wrong format, checksum mismatch)
  is a refusal (``OutputError``, exit 4) naming the file: nothing is deleted, the user decides;
- the candidate whose identity equals this run's is adopted (most journaled shards, then the newest); if
  candidates exist but none matches: refusal, exit 4 "partial output does not match this run: <what changed>"
  (input fingerprint, flags, tensor layout, or the fwconvert/torch version); the leftover is kept;
- no candidate at all: a normal fresh run (an info line says so);
- in the adopted folder each journaled shard is kept, untouched, only if it is a regular, singly linked file
  whose size and sha256 match the journal; anything else in the folder (shards that were being written,
  shards that do not verify, other files) is deleted and written again.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat

from ..errors import OutputError
from .writer import _OPEN_FLAGS, PARTIAL_TAG, AtomicOutput, fsync_dir, leftovers

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

log = logging.getLogger("fwconvert")

JOURNAL_NAME = ".fwconvert-journal.json"
JOURNAL_FORMAT = "fwconvert-resume/1"
JOURNAL_CAP = 16 << 20
_RO = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
_HEX = frozenset("0123456789abcdef")


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def run_identity(input_fingerprint: str, flags: dict, plan: dict, max_shard_bytes: int) -> dict:
    """What a resumed run must share with the interrupted one (recorded in the journal)."""
    import torch

    from .. import __version__

    layout = {"max_shard_bytes": int(max_shard_bytes),
              "tensors": [[n, [int(d) for d in shape], int(nb)] for n, (shape, nb) in plan.items()]}
    ident = {"versions": {"fwconvert": __version__, "torch": torch.__version__},
             "input_fingerprint": input_fingerprint, "flags": flags,
             "layout_sha256": hashlib.sha256(_canonical(layout)).hexdigest()}
    return json.loads(_canonical(ident))  # JSON-normal (tuples -> lists), as read back from a journal


def mismatch(old: dict, new: dict):
    """None when the journal's identity ``old`` equals this run's ``new``, else what changed (one line)."""
    ov, nv = old.get("versions") or {}, new["versions"]
    for k in nv:
        if ov.get(k) != nv[k]:
            return f"{k} version changed (partial: {ov.get(k)}, this run: {nv[k]})"
    if old.get("input_fingerprint") != new["input_fingerprint"]:
        return (f"input changed (fingerprint of the source's config, tensor headers and sampled values: partial "
                f"{str(old.get('input_fingerprint'))[:12]}..., this run {str(new['input_fingerprint'])[:12]}...)")
    of, nf = old.get("flags") or {}, new["flags"]
    if of != nf:
        keys = sorted(k for k in set(of) | set(nf) if of.get(k) != nf.get(k))
        return "flags changed (" + ", ".join(f"{k}: partial {of.get(k)!r}, this run {nf.get(k)!r}" for k in keys) + ")"
    if old.get("layout_sha256") != new["layout_sha256"]:
        return "tensor layout changed (planned tensors or maximum shard size)"
    if old != new:
        return "run identity changed"
    return None


def _checksum(body: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in body.items() if k != "checksum"})).hexdigest()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _valid_record(name, rec) -> bool:
    return (isinstance(name, str) and name.endswith(".safetensors") and os.path.basename(name) == name
            and name not in (".", "..") and "\\" not in name and "\0" not in name and isinstance(rec, dict)
            and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64 and set(rec["sha256"]) <= _HEX
            and _is_int(rec.get("size")) and _is_int(rec.get("data_bytes")))


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


def read_journal(path: str) -> dict:
    """The parsed journal at ``path``; OutputError (exit 4, naming the file) if it cannot be trusted."""
    def bad(why):
        return OutputError(f"{path}: resume journal is unreadable ({why}); delete its folder "
                           f"{os.path.dirname(path)} or run without --resume")

    try:
        fd = os.open(path, _RO)
    except OSError as e:
        raise bad("a symbolic link" if e.errno == errno.ELOOP else e.strerror) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise bad("not a regular file")
        if st.st_size > JOURNAL_CAP:
            raise bad(f"{st.st_size} bytes, more than {JOURNAL_CAP}")
        chunks, n = [], 0
        while n <= JOURNAL_CAP:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
            n += len(b)
    finally:
        os.close(fd)
    try:
        body = json.loads(b"".join(chunks).decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise bad(f"not valid JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(body, dict) or body.get("format") != JOURNAL_FORMAT:
        raise bad(f"not a {JOURNAL_FORMAT} journal")
    if body.get("checksum") != _checksum(body):
        raise bad("checksum mismatch: torn or edited")
    shards = body.get("shards")
    if not isinstance(body.get("identity"), dict) or not isinstance(shards, dict):
        raise bad("identity or shards missing")
    wrong = [k for k, v in shards.items() if not _valid_record(k, v)]
    if wrong:
        raise bad(f"invalid shard record {wrong[0]!r}")
    return body


def _verify_file(path: str, rec: dict):
    """None if ``path`` is a regular, singly linked file of the recorded size and sha256, else why not."""
    try:
        fd = os.open(path, _RO)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return "a symbolic link" if e.errno == errno.ELOOP else e.strerror
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return "not a regular, singly linked file"
        if st.st_size != rec["size"]:
            return f"{st.st_size} bytes, the journal says {rec['size']}"
        sha = hashlib.sha256()
        for block in iter(lambda: os.read(fd, 1 << 22), b""):
            sha.update(block)
        if sha.hexdigest() != rec["sha256"]:
            return "sha256 differs from the journal"
        return None
    finally:
        os.close(fd)


def _lock(path: str, block: bool):
    """An fd holding flock(LOCK_EX) on the folder ``path``; None if another process holds it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                return None
            # locking not supported on this filesystem: go on unlocked
    return fd


def _clear_except(folder: str, keep) -> None:
    """Delete every entry of ``folder`` but ``keep`` (no link is followed)."""
    for name in os.listdir(folder):
        if name in keep:
            continue
        p = os.path.join(folder, name)
        if stat.S_ISDIR(os.lstat(p).st_mode):
            shutil.rmtree(p)
        else:
            os.unlink(p)


def _report(paths, resumable_hint: bool) -> None:
    for p in paths:
        hint = "rerun with --resume to continue it, or delete it" if resumable_hint and os.path.isfile(
            os.path.join(p, JOURNAL_NAME)) else "delete it when done"
        log.warning("Warning: leftover from an earlier interrupted run: %s (not reused; %s)", p, hint)


class ResumableOutput(AtomicOutput):
    """``AtomicOutput`` whose staging folder carries the resume journal; ``resume=True`` continues a leftover.

    ``identity``: ``run_identity(...)`` of this run. ``done``: {shard name: record} of complete shards
    (kept from the leftover, then each one the writer finishes; pass ``resume=ao`` to
    ``ShardedSafetensorsWriter``). Leftovers not reused are reported (warnings) here, not by preflight."""

    def __init__(self, out, identity: dict, resume: bool = False, **kw):
        super().__init__(out, **kw)
        self.preflighted = True  # leftovers are reported (or resumed) by _new_staging, not by preflight
        self.identity, self.resume = json.loads(_canonical(identity)), bool(resume)
        self.done: dict = {}
        self._lock_fd = None

    # -- staging: fresh or adopted ---------------------------------------------------------------
    def _new_staging(self) -> str:
        if self.resume:
            adopted = self._adopt()
            if adopted is not None:
                return adopted
        else:
            _report(leftovers(self.out), True)
        staging = super()._new_staging()
        try:
            self._lock_fd = _lock(staging, block=True)
            self._write_journal(staging)
        except BaseException:
            self._unlock()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _adopt(self):
        """Lock, check and clean the leftover to continue; None when there is none."""
        cands, others, chosen = [], [], None
        try:
            for p in leftovers(self.out):
                try:
                    st = os.lstat(p)
                    if PARTIAL_TAG not in os.path.basename(p) or not stat.S_ISDIR(st.st_mode) or (
                            hasattr(os, "geteuid") and st.st_uid != os.geteuid()):
                        others.append(p)
                        continue
                    fd = _lock(p, block=False)
                except FileNotFoundError:  # removed meanwhile
                    continue
                if fd is None:
                    log.warning("Warning: %s is in use by a running conversion; not reused", p)
                    continue
                jpath = os.path.join(p, JOURNAL_NAME)
                cands.append([p, fd, None, 0.0])
                if not os.path.lexists(jpath):  # not journaled (e.g. killed before its first write)
                    others.append(p)
                    continue
                cands[-1][2] = read_journal(jpath)
                cands[-1][3] = os.lstat(jpath).st_mtime
            journaled = [c for c in cands if c[2] is not None]
            matching = [c for c in journaled if mismatch(c[2]["identity"], self.identity) is None]
            if not matching:
                if journaled:
                    p, _, body, _ = max(journaled, key=lambda c: c[3])
                    raise OutputError(f"{p}: partial output does not match this run: "
                                      f"{mismatch(body['identity'], self.identity)}; rerun with the original "
                                      "input, flags and version, run without --resume, or delete it")
                log.info("--resume: no interrupted conversion of %s to resume; starting a fresh run", self.out)
                _report(others, False)
                return None
            chosen = max(matching, key=lambda c: (len(c[2]["shards"]), c[3]))
            staging, self._lock_fd, body = chosen[0], chosen[1], chosen[2]
            _report([c[0] for c in journaled if c is not chosen] + others, False)
            kept, redo = {}, []
            for name, rec in sorted(body["shards"].items()):
                why = _verify_file(os.path.join(staging, name), rec)
                if why is None:
                    kept[name] = rec
                else:
                    redo.append(name)
                    log.warning("Warning: %s: %s; not trusted, written again", os.path.join(staging, name), why)
            _clear_except(staging, {JOURNAL_NAME, *kept})
            self.done = kept
            self.files.update({n: {"sha256": r["sha256"], "size": r["size"]} for n, r in kept.items()})
            self._write_journal(staging)  # lists only what is kept; fsyncs the folder (deletions included)
            log.info("Resuming %s: %d complete shard(s) kept (sha256 verified)%s; writing the rest", staging,
                     len(kept), f", {len(redo)} written again" if redo else "")
            return staging
        except BaseException:
            self._unlock()
            raise
        finally:
            for c in cands:
                if c is not chosen:
                    os.close(c[1])

    # -- the journal ------------------------------------------------------------------------------
    def _write_journal(self, staging: str) -> None:
        body = {"format": JOURNAL_FORMAT, "output": self.out, "identity": self.identity,
                "shards": {k: self.done[k] for k in sorted(self.done)}}
        body["checksum"] = _checksum(body)
        data = memoryview((json.dumps(body, indent=1, sort_keys=True) + "\n").encode("utf-8"))
        tmp = os.path.join(staging, JOURNAL_NAME + ".tmp")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, _OPEN_FLAGS, 0o644)
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(staging, JOURNAL_NAME))
        fsync_dir(staging)

    def shard_finished(self, fname: str, data_bytes: int) -> None:
        """Called by the shard writer once ``fname`` is complete and fsynced: journal it."""
        self.done[fname] = dict(self.files[fname], data_bytes=int(data_bytes))
        self._write_journal(self.staging)

    # -- publish ----------------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None and self.staging:
                try:  # the journal is not part of the output
                    for name in (JOURNAL_NAME, JOURNAL_NAME + ".tmp"):
                        try:
                            os.unlink(os.path.join(self.staging, name))
                        except FileNotFoundError:
                            pass
                    fsync_dir(self.staging)
                except BaseException:
                    self._cleanup()
                    raise
            return super().__exit__(exc_type, exc, tb)
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
