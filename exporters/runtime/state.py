"""Device state buffers of one batch of documents, allocated from the manifest, ping-ponged per chunk.

    chunk k:   past = cur[name]  --graph-->  present -> spare[name]      (fixed-shape state)
                                             present -> new ORT buffer    (growing KV)
    then swap cur <-> spare: present of step k is the past of step k+1; nothing is copied to the host.

numpy + onnxruntime only.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from fwconvert.errors import InputError

from ..onnx.io_spec import BATCH, PAST, Manifest, StateSpec


def _concrete(shape: List, batch: int) -> List[int]:
    return [batch if s == BATCH else 0 if s == PAST else int(s) for s in shape]


def _initial_array(spec: StateSpec, batch: int, folder: str) -> np.ndarray:
    dims = _concrete(spec.shape, batch)
    kind = spec.init.get("kind")
    if kind == "zeros":
        return np.zeros(dims, dtype=spec.dtype)
    if kind in ("copy", "array"):
        path = os.path.join(folder, os.path.basename(str(spec.init.get("file", ""))))
        if os.path.islink(path) or not os.path.isfile(path):
            raise InputError(f"{path}: initial value file of state {spec.input!r} is missing or not a regular file")
        try:
            with np.load(path, allow_pickle=False) as z:
                one = z[spec.init["array"]]
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{path}: cannot read initial value of state {spec.input!r} ({e})") from None
        axis = spec.shape.index(BATCH)
        want = _concrete(spec.shape, 1)
        if list(one.shape) != want:
            raise InputError(f"{path}: initial value of {spec.input!r} has shape {list(one.shape)}, expected {want}")
        return np.ascontiguousarray(np.repeat(one.astype(spec.dtype), batch, axis=axis))
    raise InputError(f"manifest: state {spec.input!r} has unknown initial value kind {kind!r}")


def initial_arrays(specs: List[StateSpec], batch: int, folder: str) -> Dict[str, np.ndarray]:
    """Input name -> the initial value of that state for ``batch`` documents (host arrays)."""
    return {s.input: _initial_array(s, batch, folder) for s in specs}


class StateBuffers:
    """The state of ``batch`` documents as OrtValues on ``device`` (``cpu`` or ``cuda``)."""

    def __init__(self, manifest: Manifest, batch: int, folder: str, device: str, device_id: int = 0):
        import onnxruntime as ort

        self._ort = ort
        self.batch, self.device, self.device_id = batch, device, device_id
        self.specs = manifest.state
        self.cur: Dict[str, object] = {}
        self.spare: Dict[str, object] = {}
        self.fixed = {s.input: not s.grows for s in self.specs}
        for s, arr in zip(self.specs, initial_arrays(self.specs, batch, folder).values()):
            self.cur[s.input] = self.put(arr)
            if self.fixed[s.input]:
                self.spare[s.input] = self.put(np.zeros_like(arr))

    def put(self, arr: np.ndarray):
        """``arr`` copied into a new OrtValue on the state's device."""
        return self._ort.OrtValue.ortvalue_from_numpy(arr, self.device, self.device_id)

    def advance(self, presents: Dict[str, object]) -> None:
        """Make the step's outputs the next step's inputs (swap the ping-pong pair where fixed)."""
        for s in self.specs:
            if self.fixed[s.input]:
                self.cur[s.input], self.spare[s.input] = self.spare[s.input], self.cur[s.input]
            else:
                self.cur[s.input] = presents[s.output]

    def position(self) -> np.ndarray:
        return self.cur["position"].numpy()

    def to_numpy(self) -> Dict[str, np.ndarray]:
        """Host copies of the current state, keyed by decoder state key (for verify and debugging)."""
        return {s.key: self.cur[s.input].numpy() for s in self.specs}
