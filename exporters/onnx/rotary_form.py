"""RoPE as onnxruntime's fused ``com.microsoft.RotaryEmbedding``: one kernel where the traced form has four.

The export form of RoPE (``fwconvert/modeling/rope.py::apply_rope`` with the rotation matrix R) traces to

    out = Mul(X, Unsqueeze(cos)) + Mul(MatMul(X, R), Unsqueeze(sin))        X [B, T, N, hd], cos/sin [B, T, hd]

with cos = [Cast](Cos(Concat(f, f))), sin the same with Sin, f [B, T, hd/2] the angles (positions × inverse
frequencies): two multiplies, a GEMM and an add per RoPE per layer (for SmolLM2 at batch 8 about 0.9 ms of a
6.5 ms step, and 4 of the ~23 kernels per layer). ``rotary_embedding`` rewrites each into

    Reshape(RotaryEmbedding(Reshape(X, [B, T, N·hd]), ids, cos_rows, sin_rows), [B, T, N, hd])

where cos_rows = [Cast](Cos(f)) reshaped to [B·T, hd/2] (sin_rows likewise) and ids [B, T] = b·T + t: every token
indexes its own row, so the op sees exactly the angles the graph computed, at any position (a cos/sin table
indexed by the position itself would cap the positions a stream can reach). Non-interleaved RotaryEmbedding
computes x1·cos − x2·sin and x2·cos + x1·sin, which is x·cat(cos, cos) + rotate_half(x)·cat(sin, sin): the same
arithmetic (fp16 graphs round once per element instead of after each of the four ops). The cos/sin rows and ids
are made once per step and shared by every layer; the Reshapes are views.

Wide op heads (the experiment FWCONVERT_EXPERIMENT_WIDE_ROPE=1): onnxruntime's CUDA kernel runs one block of
head_size threads per (token, op head), one element per thread: for SmolLM2's 12 q·k heads of 64 at batch 8 that
is 49,152 blocks of 64 threads, 31 µs per layer (docs/benchmarks.md). With the heads' dims in the interleaved
layout (graph.py::export_form reorders the query and key weights; the traced RoPE then reads cos/sin through a
Gather in ``rope.interleaved_order`` and rotates with ``rope.interleaved_rotation_matrix``), the rewrite gives the
op interleaved=1 and G heads as one op head of G·hd (``group_size``) with cos/sin rows tiled G times: its angle
index (i / 2) mod (G·hd / 2) then reads angle (i / 2) mod (hd / 2) of each head, so the products are the same,
in G times fewer, larger blocks.
"""
from __future__ import annotations

import os

import numpy as np

from fwconvert.modeling.rope import interleaved_order

from .ir_nodes import Nodes, replace_value
from .ir_values import const_array, const_ints, dims, remove_dead


WIDE_ENV = "FWCONVERT_EXPERIMENT_WIDE_ROPE"
MAX_OP_HEAD = 1024  # onnxruntime's CUDA RotaryEmbedding enforces head_size <= max threads per block


def wide_rope_wanted() -> bool:
    """Whether this export takes the interleaved head layout and wide RoPE heads (the experiment switch above)."""
    return os.environ.get(WIDE_ENV, "") == "1"


def _rotation_form(v, hd: int):
    """"half" when ``v`` is the constant R [hd, hd] with x @ R == rotate_half(x) (rope.py::rotation_matrix),
    "interleaved" when it is rope.py::interleaved_rotation_matrix, else None."""
    if dims(v) != [hd, hd]:  # checked first: reading a projection weight just to compare it would be slow
        return None
    r = const_array(v)
    if r is None or r.shape != (hd, hd):
        return None
    r = r.astype(np.float64)
    h = hd // 2
    half = np.zeros((hd, hd), dtype=np.float64)
    half[np.arange(h) + h, np.arange(h)] = -1.0
    half[np.arange(h), np.arange(h) + h] = 1.0
    order = interleaved_order(hd).numpy()
    if np.array_equal(r, half):
        return "half"
    if np.array_equal(r, half[np.ix_(order, order)]):  # the same rotation with each head's dims reordered
        return "interleaved"
    return None


def group_size(heads: int, hd: int) -> int:
    """How many heads of an interleaved RoPE the op gets as one: the largest divisor G of ``heads`` with G·hd <=
    MAX_OP_HEAD (onnxruntime's CUDA kernel runs one thread per element of an op head, in one block)."""
    return max(g for g in range(1, heads + 1) if heads % g == 0 and g * hd <= MAX_OP_HEAD)


def _other_input(node, v):
    """The input of a two-input ``node`` that is not ``v`` (either order), else None."""
    a, b = node.inputs
    return b if a is v else a if b is v else None


def _only_use(v, op_type: str):
    uses = list(v.uses())
    if len(uses) != 1:
        return None
    node = uses[0][0]
    return node if node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _angles(table, fn: str):
    """(f, cast, interleaved) when ``table`` = Unsqueeze(c, [2]) with c = [Cast(to)](fn(Concat(f, f, axis -1))),
    or c gathered along its last axis in the interleaved order (interleaved True), else None."""
    u = table.producer()
    if u is None or u.op_type != "Unsqueeze" or len(u.inputs) < 2:
        return None
    if const_ints(u.inputs[1]) != [2]:
        return None
    c = u.inputs[0].producer()
    interleaved = c is not None and c.op_type == "Gather"
    if interleaved:
        axis, d = c.attributes.get("axis"), dims(c.inputs[0])
        if axis is None or axis.value not in (-1, 2) or d is None or len(d) != 3 or not isinstance(d[2], int):
            return None
        if const_ints(c.inputs[1]) != interleaved_order(d[2]).tolist():
            return None
        c = c.inputs[0].producer()
    cast = None
    if c is not None and c.op_type == "Cast":
        cast, c = c, c.inputs[0].producer()
    if c is None or c.op_type != fn:
        return None
    cat = c.inputs[0].producer()
    if cat is None or cat.op_type != "Concat" or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
        return None
    axis = cat.attributes.get("axis")
    f = cat.inputs[0]
    if axis is None or axis.value not in (-1, 2) or dims(f) is None or len(dims(f)) != 3:
        return None
    return f, cast, interleaved


def _match(matmul):
    """The pieces of one traced RoPE around its rotation ``matmul``: (X, f, cos cast, sin cast, Add, nodes), or None."""
    x = matmul.inputs[0]
    xd = dims(x)
    if xd is None or len(xd) != 4 or not isinstance(xd[2], int) or not isinstance(xd[3], int) or xd[3] % 2:
        return None
    form = _rotation_form(matmul.inputs[1], xd[3])
    if form is None:
        return None
    ms = _only_use(matmul.outputs[0], "Mul")
    add = _only_use(ms.outputs[0], "Add") if ms is not None else None
    if add is None:
        return None
    mc = _other_input(add, ms.outputs[0])
    mc = mc.producer() if mc is not None else None
    if mc is None or mc.op_type != "Mul" or len(mc.outputs[0].uses()) != 1:
        return None
    cos_t, sin_t = _other_input(mc, x), _other_input(ms, matmul.outputs[0])
    if cos_t is None or sin_t is None:
        return None
    c, s = _angles(cos_t, "Cos"), _angles(sin_t, "Sin")
    if c is None or s is None or c[0] is not s[0] or c[2] != s[2] or c[2] != (form == "interleaved"):
        return None
    if (c[1] is None) != (s[1] is None) or (c[1] is not None and c[1].attributes["to"].value != s[1].attributes["to"].value):
        return None
    return x, c[0], c[1], c[2], add, [add, mc, ms, matmul]


def rotary_embedding(graph) -> int:
    """Rewrite every traced RoPE (module doc) into a fused ``com.microsoft.RotaryEmbedding``; returns how many."""
    shared = {}  # per angle tensor f and op-head group: (ids, cos rows, sin rows), made once after f's producer
    done = 0
    for mm in [n for n in graph if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")]:
        m = _match(mm)
        if m is None:
            continue
        x, f, cast, interleaved, add, old = m
        hd, heads = dims(x)[3], dims(x)[2]
        g = group_size(heads, hd) if interleaved else 1
        if (id(f), g) not in shared:
            shared[(id(f), g)] = _rows(graph, f, cast, hd, g)
        ids, cos_rows, sin_rows = shared[(id(f), g)]
        new = Nodes()
        x3 = new.op("Reshape", x, new.const(np.array([0, 0, heads * hd], dtype=np.int64)))
        rot = new.op("RotaryEmbedding", x3, ids, cos_rows, sin_rows, domain="com.microsoft", interleaved=int(interleaved))
        out = new.op("Reshape", rot, new.const(np.array([0, 0, heads, hd], dtype=np.int64)))
        graph.insert_before(add, new.nodes)
        replace_value(graph, add.outputs[0], out)
        remove_dead(graph, old)
        done += 1
    return done


def _rows(graph, f, cast, hd: int, g: int):
    """(ids [B, T], cos rows [B·T, g·hd/2], sin rows [B·T, g·hd/2]) from the angles f [B, T, hd/2], inserted after
    f: each row the token's hd/2 angles, g times over (one op head of g interleaved heads)."""
    new = Nodes()

    def i64(values):
        return new.const(np.array(values, dtype=np.int64))

    flat = i64([-1, hd // 2])
    rows = []
    for fn in ("Cos", "Sin"):
        v = new.op(fn, f)
        if cast is not None:
            v = new.op("Cast", v, to=int(cast.attributes["to"].value))
        v = new.op("Reshape", v, flat)
        rows.append(new.op("Tile", v, i64([1, g])) if g > 1 else v)
    bt = new.op("Slice", new.op("Shape", f), i64([0]), i64([2]))  # [B, T]
    n = new.op("Squeeze", new.op("ReduceProd", bt), i64([0]))  # B·T
    ids = new.op("Reshape", new.op("Range", i64(0), n, i64(1)), bt)
    producer = f.producer()
    if producer is not None:
        graph.insert_after(producer, new.nodes)
    else:
        graph.insert_before(next(iter(graph)), new.nodes)
    return ids, rows[0], rows[1]


__all__ = ["rotary_embedding"]
