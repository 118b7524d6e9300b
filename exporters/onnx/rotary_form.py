"""RoPE as onnxruntime's fused ``com.microsoft.RotaryEmbedding``: one kernel where the traced form has four.

Exports trace attention in the interleaved head layout (graph.py::export_form reorders the query and key weights so
each head's dims are in ``rope.interleaved_order``: the pair (p, p + hd/2) that RoPE rotates together sits at
(2p, 2p + 1)). The export form of RoPE (``fwconvert/modeling/rope.py::apply_rope`` with
``rope.interleaved_rotation_matrix`` R, cos/sin read in that order) traces to

    out = Mul(X, Unsqueeze(cos)) + Mul(MatMul(X, R), Unsqueeze(sin))        X [B, T, N, hd], cos/sin [B, T, hd]

with cos = Gather([Cast](Cos(Concat(f, f))), order, axis -1), sin the same with Sin, f [B, T, hd/2] the angles
(positions × inverse frequencies): two multiplies, a GEMM and an add per RoPE per layer. ``rotary_embedding``
rewrites each into

    Reshape(RotaryEmbedding(Reshape(X, [B, T, N·hd]), ids, cos_rows, sin_rows, interleaved=1), [B, T, N, hd])

where cos_rows = [Cast](Cos(f)) reshaped to [B·T, hd/2] and tiled G times (sin_rows likewise) and ids [B, T] =
b·T + t: every token indexes its own row, so the op sees exactly the angles the graph computed, at any position (a
cos/sin table indexed by the position itself would cap the positions a stream can reach, and is no faster:
benchmarks/rope_probe.py). Interleaved RotaryEmbedding computes out[2p] = x[2p]·cos − x[2p + 1]·sin and out[2p + 1]
= x[2p + 1]·cos + x[2p]·sin with angle index (i / 2) mod (op head / 2): the same products as the traced form (fp16
graphs round once per element instead of after each of the four ops), so G heads go to the op as one op head of
G·hd (``group_size``). onnxruntime's CUDA kernel runs one block of op-head-size threads per (token, op head), one
element per thread; G-fold fewer, larger blocks take less time (H100, session 17, docs/benchmarks.md, when q and k
still shared one RoPE: SmolLM2's 12 q·k heads of 64 as one op head of 768 at B = 8, 31.3 -> 27.6 µs per layer;
the LLaMA-1B shape's 40 heads as 4 op heads of 640, 100.5 -> 70.2 µs). q and k now get a RoPE each
(graph.py::export_form): SmolLM2's 9 query heads as one op head of 576 and its 3 key heads as one of 192; the 1B
shape's 32 query heads as 2 op heads of 1,024, its 8 key heads as one of 512. The keys in the KV state are in the
interleaved order too (the manifest's ``key_dim_order``). The cos/sin rows and ids are made once per step and
shared by every layer; the Reshapes are views.
"""
from __future__ import annotations

import numpy as np
import torch

from fwconvert.modeling.rope import interleaved_order, interleaved_rotation_matrix

from .ir_nodes import Nodes, replace_value
from .ir_values import const_array, const_ints, dims, remove_dead


MAX_OP_HEAD = 1024  # onnxruntime's CUDA RotaryEmbedding enforces head_size <= max threads per block


def _is_rotation(v, hd: int) -> bool:
    """Whether ``v`` is the constant rope.py::interleaved_rotation_matrix(hd)."""
    if dims(v) != [hd, hd]:  # checked first: reading a projection weight just to compare it would be slow
        return False
    r = const_array(v)
    return r is not None and r.shape == (hd, hd) and np.array_equal(
        r.astype(np.float64), interleaved_rotation_matrix(hd, torch.float64).numpy())


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
    """(f, cast) when ``table`` = Unsqueeze(g, [2]) with g = c gathered along its last axis in the interleaved
    order and c = [Cast(to)](fn(Concat(f, f, axis -1))), else None."""
    u = table.producer()
    if u is None or u.op_type != "Unsqueeze" or len(u.inputs) < 2:
        return None
    if const_ints(u.inputs[1]) != [2]:
        return None
    c = u.inputs[0].producer()
    if c is None or c.op_type != "Gather":
        return None
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
    return f, cast


def _match(matmul):
    """The pieces of one traced RoPE around its rotation ``matmul``: (X, f, cos cast, Add, nodes), or None."""
    x = matmul.inputs[0]
    xd = dims(x)
    if xd is None or len(xd) != 4 or not isinstance(xd[2], int) or not isinstance(xd[3], int) or xd[3] % 2:
        return None
    if not _is_rotation(matmul.inputs[1], xd[3]):
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
    if c is None or s is None or c[0] is not s[0]:
        return None
    if (c[1] is None) != (s[1] is None) or (c[1] is not None and c[1].attributes["to"].value != s[1].attributes["to"].value):
        return None
    return x, c[0], c[1], add, [add, mc, ms, matmul]


def rotary_embedding(graph) -> int:
    """Rewrite every traced RoPE (module doc) into a fused ``com.microsoft.RotaryEmbedding``; returns how many."""
    shared = {}  # per angle tensor f and op-head group: (ids, cos rows, sin rows), made once after f's producer
    done = 0
    for mm in [n for n in graph if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")]:
        m = _match(mm)
        if m is None:
            continue
        x, f, cast, add, old = m
        hd, heads = dims(x)[3], dims(x)[2]
        g = group_size(heads, hd)
        if (id(f), g) not in shared:
            shared[(id(f), g)] = _rows(graph, f, cast, hd, g)
        ids, cos_rows, sin_rows = shared[(id(f), g)]
        new = Nodes()
        x3 = new.op("Reshape", x, new.const(np.array([0, 0, heads * hd], dtype=np.int64)))
        rot = new.op("RotaryEmbedding", x3, ids, cos_rows, sin_rows, domain="com.microsoft", interleaved=1)
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
