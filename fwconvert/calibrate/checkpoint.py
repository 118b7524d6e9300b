"""Calibration checkpoints: atomic, verified, the last two kept, resumable bit for bit.

Layout (a sibling of the output folder, same filesystem)::

    .<out>.fwconvert-calibration/
        step-00000010/ state.pt  COMPLETE      <- COMPLETE (sha256 of state.pt, run id) written last
        step-00000020/ ...
        .step-00000030.partial-<pid>/          <- being written; renamed into place when complete

A checkpoint without a COMPLETE marker, or whose state.pt does not match the recorded hash, is torn:
resume skips it with a warning and uses the previous one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import InputError, OutputError

KEEP = 2
STATE_FILE = "state.pt"
MARKER = "COMPLETE"


def work_dir_for(out: str) -> str:
    """The checkpoint folder that belongs to output folder ``out``."""
    out = os.path.abspath(out.rstrip(os.sep))
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.fwconvert-calibration")


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(work_dir: str, step: int, payload: dict, run_id: str, identity: Optional[dict] = None) -> str:
    """Write ``payload`` as checkpoint ``step`` atomically; prune to the last ``KEEP``; return its folder.
    ``identity`` (what ``run_id`` was made from) goes into the COMPLETE marker, for ``load_latest``'s message."""
    os.makedirs(work_dir, exist_ok=True)
    name = f"step-{step:08d}"
    staging = os.path.join(work_dir, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging)
    state_path = os.path.join(staging, STATE_FILE)
    torch.save(payload, state_path)
    with open(state_path, "rb+") as f:
        os.fsync(f.fileno())
    marker = {"step": step, "sha256": _sha256(state_path), "run_id": run_id}
    if identity is not None:
        marker["identity"] = identity
    _write_file(os.path.join(staging, MARKER), json.dumps(marker).encode())
    _fsync_dir(staging)
    final = os.path.join(work_dir, name)
    if os.path.lexists(final):
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(work_dir)
    for old in list_checkpoints(work_dir)[:-KEEP]:
        shutil.rmtree(os.path.join(work_dir, old), ignore_errors=True)
    return final


def list_checkpoints(work_dir: str) -> list:
    """Checkpoint folder names (complete or not), oldest first."""
    if not os.path.isdir(work_dir):
        return []
    return sorted(n for n in os.listdir(work_dir) if n.startswith("step-") and n[5:].isdigit())


def _verify(folder: str, run_id: str) -> Optional[str]:
    """None if ``folder`` is a complete checkpoint of this run, else why not."""
    marker_path = os.path.join(folder, MARKER)
    if not os.path.isfile(marker_path):
        return "no COMPLETE marker"
    try:
        with open(marker_path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable COMPLETE marker ({e})"
    if marker.get("run_id") != run_id:
        return "run_mismatch"
    state_path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(state_path) or _sha256(state_path) != marker.get("sha256"):
        return "state.pt does not match its recorded sha256 (truncated or modified)"
    return None


def _short(v) -> str:
    return f"{v[:12]}..." if isinstance(v, str) and len(v) > 12 else repr(v)


def identity_mismatch(old, new: dict) -> Optional[str]:
    """What differs between a checkpoint's recorded run identity ``old`` and this run's ``new`` (one line), or None
    when ``old`` is not a recorded identity (a checkpoint of an older fwconvert)."""
    if not isinstance(old, dict):
        return None
    parts = []
    if old.get("version") != new.get("version"):
        parts.append(f"fwconvert version changed (checkpoint {old.get('version')}, this run {new.get('version')})")
    if old.get("input") != new.get("input"):
        parts.append(f"model changed (fingerprint of its config, tensor headers and sampled values: checkpoint "
                     f"{_short(old.get('input'))}, this run {_short(new.get('input'))})")
    od, nd = old.get("docs") if isinstance(old.get("docs"), dict) else {}, new.get("docs") or {}
    if od != nd:
        parts.append(f"training documents changed (checkpoint {od.get('documents')} with keys sha256 "
                     f"{_short(od.get('keys_sha256'))}, this run {nd.get('documents')} with "
                     f"{_short(nd.get('keys_sha256'))})")
    flags = {}
    for group in ("settings", "extra"):
        o = old.get(group) if isinstance(old.get(group), dict) else {}
        n = new.get(group) or {}
        flags.update({k: (o.get(k), n.get(k)) for k in set(o) | set(n) if o.get(k) != n.get(k)})
    if flags:
        parts.append("flags changed (" + ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}"
                                                   for k, (a, b) in sorted(flags.items())) + ")")
    return "; ".join(parts) if parts else None


def _recorded_identity(folder: str):
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            return json.load(f).get("identity")
    except (OSError, ValueError, AttributeError):
        return None


def load_latest(work_dir: str, run_id: str, warn: Callable[[str], None], map_location="cpu",
                identity: Optional[dict] = None) -> Optional[dict]:
    """The newest complete checkpoint's payload (falling back over torn ones with a warning), or None.

    A complete checkpoint of a different run (other input, flags or version) is an OutputError, naming what
    differs when both this run's ``identity`` and the checkpoint's recorded one are known."""
    for name in reversed(list_checkpoints(work_dir)):
        folder = os.path.join(work_dir, name)
        why = _verify(folder, run_id)
        if why == "run_mismatch":
            diff = identity_mismatch(_recorded_identity(folder), identity) if identity is not None else None
            what = f": {diff}" if diff else " (different model, data, flags or fwconvert version)"
            raise OutputError(f"{folder}: checkpoint does not match this run{what}; remove the folder or run "
                              "without --resume")
        if why is not None:
            warn(f"skipping torn checkpoint {folder}: {why}; falling back to the previous one")
            continue
        try:
            return torch.load(os.path.join(folder, STATE_FILE), map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a corrupt pickle stream is one more kind of torn file
            raise InputError(f"{folder}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    return None


def clean_partials(work_dir: str) -> None:
    """Remove staging folders left by killed runs."""
    if os.path.isdir(work_dir):
        for n in os.listdir(work_dir):
            if n.startswith(".step-") and ".partial-" in n:
                shutil.rmtree(os.path.join(work_dir, n), ignore_errors=True)
