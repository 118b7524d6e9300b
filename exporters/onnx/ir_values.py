"""Reading an onnx_ir graph for the rewrites: constant values, dims, the shapes a rewrite's values imply,
Transpose permutations, graph.py's RMS form; and removing the nodes a rewrite left unread. Shared by every rewrite
module (attention_forms, query_order, rotary_form), which import nothing from each other.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def const_array(v) -> Optional[np.ndarray]:
    """The value of a constant tensor (an initializer or a ``Constant`` node's output), else None."""
    if v is None:
        return None
    t = v.const_value
    if t is None:
        p = v.producer()
        if p is None or p.op_type != "Constant" or "value" not in p.attributes:
            return None
        t = p.attributes["value"].value
    try:
        return np.asarray(t.numpy())
    except Exception:  # noqa: BLE001 - not a readable constant
        return None


def const_ints(v) -> Optional[list]:
    """The values of a constant int tensor, flattened, else None."""
    a = const_array(v)
    return None if a is None else [int(x) for x in a.reshape(-1)]


def dims(v) -> Optional[list]:
    """The dims the graph records for ``v`` (ints, symbolic ones as strings), else None."""
    if v is None or v.shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in v.shape]


def sole_producer(v, op_type: str):
    """The ``op_type`` node that makes ``v`` when nothing but one node reads ``v``, else None."""
    p = v.producer() if v is not None else None
    return p if p is not None and p.op_type == op_type and len(v.uses()) == 1 else None


def remove_dead(graph, nodes) -> None:
    """Remove each of ``nodes`` (in order) whose outputs nobody reads any more."""
    for node in nodes:
        if node is not None and node.graph is graph and not any(o.uses() for o in node.outputs) \
                and not any(o.is_graph_output() for o in node.outputs):
            graph.remove(node, safe=True)


def shape_of(v, depth: int = 0) -> Optional[list]:
    """``v``'s dims, or where the graph carries none (values a rewrite made), the ones its Reshape's constant target
    or its shape-keeping producer (RotaryEmbedding, Cast, Identity) gives."""
    d = dims(v)
    p = v.producer()
    if d is not None or p is None or depth > 8:
        return d
    if p.op_type == "Reshape":
        target, xd = const_ints(p.inputs[1]), shape_of(p.inputs[0], depth + 1)
        if target is None or target.count(-1) > 1:
            return None
        return [(xd[i] if xd is not None and i < len(xd) else f"?{i}") if a == 0 else ("?" if a == -1 else a)
                for i, a in enumerate(target)]
    if p.op_type in ("RotaryEmbedding", "Cast", "Identity"):
        return shape_of(p.inputs[0], depth + 1)
    if p.op_type == "Mul" and len(p.inputs) == 2:  # x / rms(x), or x times a [last axis] scale: x's dims
        x = rms_source(p)
        if x is not None:
            return shape_of(x, depth + 1)
        a, b = (shape_of(i, depth + 1) for i in p.inputs)
        if a is not None and b is not None and len(b) == 1 and b[0] == a[-1]:
            return a
        if a is not None and b is not None and len(a) == 1 and a[0] == b[-1]:
            return b
    return None


def rms_source(node):
    """x when ``node = Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Mul(x, x), axes=[-1]), eps))))`` (graph.py's RMS form)
    and nothing outside it reads x or its intermediates: every value it makes is per position over the last axis,
    so it treats heads alike. Else None."""
    for x, r in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        chain, ok, v = [], True, r
        for op in ("Reciprocal", "Sqrt", "Add", "ReduceMean", "Mul"):
            p = v.producer() if v is not None else None
            if p is None or p.op_type != op or v.is_graph_output() or len(v.uses()) != 1:
                ok = False
                break
            chain.append(p)
            v = p.inputs[0]
        if not ok:
            continue
        add, mean, square = chain[2], chain[3], chain[4]
        eps = add.inputs[1]
        axes = const_ints(mean.inputs[1]) if len(mean.inputs) > 1 and mean.inputs[1] is not None else None
        keep = mean.attributes["keepdims"].value if "keepdims" in mean.attributes else 1
        e = const_array(eps)
        if e is None or e.size != 1 or keep != 1 \
                or axes not in ([-1], [len(shape_of(x) or []) - 1]) or list(square.inputs) != [x, x]:
            continue
        if not x.is_graph_output() and sorted(id(u.node) for u in x.uses()) == sorted([id(square)] * 2 + [id(node)]):
            return x
    return None


def transpose_perm(node) -> Optional[tuple]:
    """A Transpose's explicit permutation, else None (the default reverses the axes; the graphs here name theirs)."""
    a = node.attributes.get("perm")
    return tuple(a.value) if a is not None else None


__all__ = ["const_array", "const_ints", "dims", "remove_dead", "rms_source", "shape_of", "sole_producer",
           "transpose_perm"]
