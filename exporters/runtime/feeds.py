"""Feed validation against the session's own inputs (``get_inputs()``), before anything runs.

Errors read like ``input 'x': expected float32[batch,2,past,16], got float64[1,2,0,16]``; symbolic
axes must agree across inputs (every ``batch`` axis has one size). numpy + onnxruntime only.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from fwconvert.errors import InputError

from ..onnx.io_spec import KV_PREFIX, Manifest

ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16",
             "tensor(bool)": "bool", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}


def is_int(x, lo: int = 0) -> bool:
    """``x`` is an int (not a bool) of at least ``lo``."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


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


def check_manifest_against_graph(manifest: Manifest, inputs: Dict[str, object], outputs: Dict[str, object],
                                 past_pin: Optional[int] = None) -> None:
    """The manifest's state must describe the graph's IO exactly (names, dtypes, ranks, static dims), and its
    top-level fields must agree with what the graph declares (``_top_level_problem``)."""
    declared = ["input_ids"] + [s.input for s in manifest.state]
    if sorted(declared) != sorted(inputs):
        raise InputError(f"manifest and graph disagree on inputs: manifest {declared}, graph {list(inputs)}")
    want_out = ["logits"] + [s.output for s in manifest.state]
    if sorted(want_out) != sorted(outputs):
        raise InputError(f"manifest and graph disagree on outputs: manifest {want_out}, graph {list(outputs)}")
    for s in manifest.state:
        want_dt, want = expected_of(inputs[s.input])
        same = want_dt == s.dtype and len(want) == len(s.shape) and all(
            not (isinstance(w, int) and isinstance(m, int)) or w == m for w, m in zip(want, s.shape))
        if not same:
            raise InputError(f"input {s.input!r}: expected {_fmt(want_dt, want)}, "
                             f"the manifest declares {_fmt(s.dtype, s.shape)}")
    problem = _top_level_problem(manifest, inputs, outputs, past_pin)
    if problem:
        raise InputError(problem)


def _top_level_problem(m: Manifest, inputs: dict, outputs: dict, past_pin: Optional[int]) -> Optional[str]:
    """What the manifest's top-level fields (vocab_size, dtype, attention, window, sink_tokens, key_dim_order) say
    that the graph's declared logits and KV inputs contradict, or None. ``past_pin``: the size a session pinned the ``past`` axis
    to (onnxruntime then declares it as that number)."""
    logits = outputs.get("logits")
    dims = list(logits.shape) if logits is not None and logits.shape is not None else []
    if dims and is_int(dims[-1]) and dims[-1] != m.vocab_size:
        return f"vocab_size is {m.vocab_size}, but the graph's logits have {dims[-1]} entries per token"
    want_dt = "float16" if m.dtype == "fp16" else "float32"
    sinks = 0
    for s in m.state:
        if not s.key.startswith(KV_PREFIX) or s.input not in inputs:
            continue
        dt, shape = expected_of(inputs[s.input])
        if dt != want_dt:
            return f"dtype is {m.dtype!r}, but the graph's KV input {s.input!r} is {dt}"
        if len(shape) != 4:
            continue
        order = m.key_dim_order
        if order is not None and (not isinstance(order, list) or not all(is_int(i) for i in order)
                                  or sorted(order) != list(range(len(order))) or not is_int(shape[3])
                                  or len(order) != shape[3]):
            return f"key_dim_order must be an order of the {shape[3]} head dims of {s.input!r}, got {order!r}"
        n = shape[2]  # [batch, heads, positions, head_dim]
        growing = isinstance(n, str) or (past_pin is not None and n == past_pin)
        if s.key.endswith((".sink_key", ".sink_value")):
            sinks = n
            if n != m.sink_tokens:
                return f"sink_tokens is {m.sink_tokens}, but the graph's input {s.input!r} holds {n} sink positions"
        elif m.attention == "full" and not growing:
            return (f"attention is 'full', but the graph's KV input {s.input!r} has a fixed past axis of {n} "
                    f"(a window export)")
        elif m.attention == "window" and (growing or not is_int(m.window) or n not in (m.window, m.window - 1)):
            # W slots, W - 1 in exports made before 2026-12-02 (still run; verify names the older layout)
            what = "a growing past axis (a full-attention export)" if growing else f"a past axis of {n}"
            return f"attention is 'window' with window {m.window}, but the graph's KV input {s.input!r} has {what}"
    if m.sink_tokens and not sinks:
        return f"sink_tokens is {m.sink_tokens}, but the graph has no sink inputs"
    return None
