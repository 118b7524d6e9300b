"""Feed validation against the session's own inputs (``get_inputs()``), before anything runs.

Errors read like ``input 'x': expected float32[batch,2,past,16], got float64[1,2,0,16]``; symbolic
axes must agree across inputs (every ``batch`` axis has one size). numpy + onnxruntime only.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from fwconvert.errors import InputError

from ..onnx.io_spec import Manifest

ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16",
             "tensor(bool)": "bool", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}


def _fmt(dtype: str, dims: Sequence) -> str:
    return f"{dtype}[{','.join('?' if d is None else str(d) for d in dims)}]"


def expected_of(arg) -> Tuple[str, List]:
    """(numpy dtype name, dims with ints or axis names) of an onnxruntime NodeArg."""
    return ORT_TYPES.get(arg.type, arg.type), list(arg.shape)


def check_feeds(inputs: Dict[str, object], feeds: Dict[str, Tuple[str, List[int]]]) -> None:
    """InputError unless ``feeds`` (name -> (dtype, shape)) exactly match the graph inputs."""
    missing = [n for n in inputs if n not in feeds]
    if missing:
        raise InputError(f"missing input(s) {missing}; the graph needs {list(inputs)}")
    extra = [n for n in feeds if n not in inputs]
    if extra:
        raise InputError(f"unexpected input(s) {extra}; the graph takes {list(inputs)}")
    sizes: Dict[str, Tuple[int, str]] = {}
    for name, arg in inputs.items():
        want_dt, want = expected_of(arg)
        got_dt, got = feeds[name]
        bad = got_dt != want_dt or len(got) != len(want)
        for w, g in zip(want, got):
            if isinstance(w, int) and w != g:
                bad = True
            elif isinstance(w, str) and w in sizes and sizes[w][0] != g and not bad:
                other = sizes[w][1]
                raise InputError(f"input {name!r}: axis {w!r} is {g} but {sizes[w][0]} in input {other!r}; "
                                 f"expected {_fmt(want_dt, want)}, got {_fmt(got_dt, got)}")
            elif isinstance(w, str):
                sizes.setdefault(w, (g, name))
        if bad:
            raise InputError(f"input {name!r}: expected {_fmt(want_dt, want)}, got {_fmt(got_dt, got)}")


def check_manifest_against_graph(manifest: Manifest, inputs: Dict[str, object], outputs: List[str]) -> None:
    """The manifest's state must describe the graph's IO exactly (names, dtypes, ranks, static dims)."""
    declared = ["input_ids"] + [s.input for s in manifest.state]
    if sorted(declared) != sorted(inputs):
        raise InputError(f"manifest and graph disagree on inputs: manifest {declared}, graph {list(inputs)}")
    want_out = ["logits"] + [s.output for s in manifest.state]
    if sorted(want_out) != sorted(outputs):
        raise InputError(f"manifest and graph disagree on outputs: manifest {want_out}, graph {outputs}")
    for s in manifest.state:
        want_dt, want = expected_of(inputs[s.input])
        same = want_dt == s.dtype and len(want) == len(s.shape) and all(
            not (isinstance(w, int) and isinstance(m, int)) or w == m for w, m in zip(want, s.shape))
        if not same:
            raise InputError(f"input {s.input!r}: expected {_fmt(want_dt, want)}, "
                             f"the manifest declares {_fmt(s.dtype, s.shape)}")
