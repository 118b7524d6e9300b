"""Grouped queries stacked without transposes: the query heads reordered in the weights instead of in each step.

``attention_forms.grouped_queries`` stacks the rep = H / H_kv query heads of a key/value group along the query
axis, with a Transpose before the attention and one after it:

    q [B, T, H·hd] -> Reshape [B, T, H_kv, rep, hd] -> Transpose [B, rep, T, H_kv, hd] -> [B, rep·T, H_kv·hd]
    MHA(num_heads = H_kv, ..., bias rows tiled (r, t))
    out -> [B, rep, T, H_kv, hd] -> Transpose [B, T, H_kv, rep, hd] -> [B, T, H·hd]

The two Transposes exist only because the projection lays the heads out in the order h = g·rep + r (group
major). ``query_heads_in_group_order`` puts them in the order p = r·H_kv + g instead, once, in the weights: the
query projection's output columns of head h move to slot p, and the output projection's input rows likewise.
Then the stacking is a view,

    q [B, T, H·hd] = [B, T, rep, H_kv·hd] -> Reshape [B, T·rep, H_kv·hd]      (row t·rep + r: query t, head r of each group)
    MHA(num_heads = H_kv, ..., bias row t·rep + r = bias row t)
    out [B, T·rep, H_kv·hd] -> Reshape [B, T, H·hd]                           (heads in slot order, as W_o now expects)

Every score and every output value is the one the transposed form computes (the same dot products, the same
softmax rows), so the graph is exact; 2 Transpose kernels per layer go. The rewrite applies only when everything
between the projection and the attention treats heads alike (Reshapes between [.., H·hd] and [.., H, hd],
Transposes, RotaryEmbedding, Cast, a bias Add) and the attention output reaches the output projection
through Reshapes alone; otherwise the layer keeps the transposed form.
"""
from __future__ import annotations

import numpy as np

from .ir_nodes import Nodes, replace_value
from .ir_values import const_ints, dims, remove_dead, rms_source, shape_of, transpose_perm


def _slot_order(heads: int, rep: int) -> np.ndarray:
    """order[p] = the original head in slot p = r·H_kv + g, i.e. h = g·rep + r."""
    kv = heads // rep
    return np.array([g * rep + r for r in range(rep) for g in range(kv)], dtype=np.int64)


def _only_reader(x, node) -> bool:
    """Whether ``node`` is the one reader of ``x`` (so reordering x's heads changes nothing else)."""
    return not x.is_graph_output() and [u.node for u in x.uses()] == [node]


def _trace_back(v, hd: int):
    """Follow the query [B, T, H·hd] back to the projection that makes it. Returns ``(edits, ok)`` where edits are
    (constant value, axis, offset, unit): head h of the query lives at ``offset + h·unit`` (``unit`` entries) along
    ``axis`` of that constant (the MatMul weight's columns, a bias Add's entries). Every value on the way must be
    read by the next node only, so the reordering reaches nothing but this attention."""
    axis, offset, unit = 2, 0, hd  # where head h lives along ``axis`` of the current value
    edits = []
    for _ in range(64):
        p, d = v.producer(), shape_of(v)
        if p is None or d is None or len(d) not in (3, 4) or axis >= len(d):
            return edits, False
        op, x = p.op_type, p.inputs[0]
        if op == "Reshape":
            xd = shape_of(x)
            if xd is None or len(xd) not in (3, 4):
                return edits, False
            if len(d) == 3 and len(xd) == 4 and axis == 2 and unit == hd and offset % hd == 0 and xd[3] == hd \
                    and isinstance(xd[2], int) and d[2] == xd[2] * hd:
                offset, unit = offset // hd, 1  # [.., N·hd] from [.., N, hd]: head h is index h of axis 2
            elif len(d) == 4 and len(xd) == 3 and axis == 2 and unit == 1 and d[3] == hd \
                    and isinstance(d[2], int) and xd[2] == d[2] * hd:
                offset, unit = offset * hd, hd
            elif d != xd:
                return edits, False
        elif op == "Transpose":
            perm = transpose_perm(p)
            if perm is None:
                return edits, False
            axis = perm[axis]
        elif op == "RotaryEmbedding" and p.domain == "com.microsoft":
            pass  # per (batch, position) angles, the same for every head
        elif op == "Mul" and axis != len(d) - 1:
            # a per-head RMS norm over the last axis (qwen3's q norm): its scale, then x / rms(x)
            scale = [i for i in p.inputs if i is not None and i.const_value is not None]
            if len(p.inputs) == 2 and len(scale) == 1 and dims(scale[0]) == [d[-1]]:
                x = p.inputs[0] if p.inputs[1] is scale[0] else p.inputs[1]
            else:
                x = rms_source(p)
                if x is None:
                    return edits, False
                v = x
                continue
        elif op not in ("Cast", "Identity", "Add", "MatMul"):
            return edits, False
        if op == "Add":
            consts = [i for i in p.inputs if i is not None and i.const_value is not None]
            if len(p.inputs) != 2 or len(consts) != 1 or axis != len(d) - 1 or dims(consts[0]) != [d[-1]] \
                    or not _only_reader(consts[0], p):
                return edits, False
            edits.append((consts[0], 0, offset, unit))
            x = p.inputs[0] if p.inputs[1] is consts[0] else p.inputs[1]
        if op == "MatMul":
            w, wd = p.inputs[1], dims(p.inputs[1])
            if w.const_value is None or not _only_reader(w, p) or wd is None or len(wd) != 2 or axis != len(d) - 1:
                return edits, False
            edits.append((w, 1, offset, unit))
            return edits, True
        if not _only_reader(x, p):
            return edits, False
        v = x
    return edits, False


def _trace_forward(v, heads: int, hd: int):
    """Follow the attention output [B, T, H·hd] through Reshapes (each its value's only reader) to the output
    projection MatMul; returns its weight (rows: the heads, hd each), else None."""
    for _ in range(16):
        d = shape_of(v)
        if v.is_graph_output() or len(v.uses()) != 1 or d is None or not (
                d[-1] == heads * hd or (len(d) >= 2 and d[-2:] == [heads, hd])):
            return None
        node = v.uses()[0].node
        if node.op_type == "Reshape" and node.inputs[0] is v:
            v = node.outputs[0]
            continue
        w = node.inputs[1] if node.op_type == "MatMul" and node.inputs[0] is v and d[-1] == heads * hd else None
        wd = dims(w) if w is not None else None
        if w is None or w.const_value is None or not _only_reader(w, node) or wd is None or len(wd) != 2 \
                or wd[0] != heads * hd:
            return None
        return w
    return None


def _permute(w, axis: int, offset: int, unit: int, order: np.ndarray) -> None:
    """Reorder the ``len(order)`` blocks of ``unit`` entries at ``offset`` along ``axis`` of the constant ``w``: block
    p takes the old block order[p]."""
    import onnx_ir as ir

    a = np.array(w.const_value.numpy())
    idx = np.arange(a.shape[axis])
    n = len(order)
    blocks = idx[offset: offset + n * unit].reshape(n, unit)
    idx[offset: offset + n * unit] = blocks[order].reshape(-1)
    w.const_value = ir.Tensor(np.take(a, idx, axis=axis), name=w.name)


def _next(node, op_type: str):
    """The one reader of ``node``'s output when ``node`` is an ``op_type`` whose output has exactly one reader."""
    out = node.outputs[0]
    if node.op_type != op_type or out.is_graph_output() or len(out.uses()) != 1:
        return None
    return out.uses()[0].node


def _stacking(n):
    """The transposed stacking around a grouped MultiHeadAttention ``n`` (grouped_queries' form):
    (q source, query nodes, output nodes, tiled-bias Tile node or None, H_kv, rep, hd), else None."""
    q3 = n.inputs[0]
    r1 = q3.producer() if q3 is not None else None
    t1 = r1.inputs[0].producer() if r1 is not None and r1.op_type == "Reshape" else None
    r0 = t1.inputs[0].producer() if t1 is not None and t1.op_type == "Transpose" else None
    if r0 is None or r0.op_type != "Reshape" or transpose_perm(t1) != (0, 3, 1, 2, 4):
        return None
    shape = const_ints(r0.inputs[1])
    if shape is None or len(shape) != 5 or shape[:2] != [0, 0]:
        return None
    kv, rep, hd = shape[2:]
    q, qd = r0.inputs[0], shape_of(r0.inputs[0])
    if qd is None or len(qd) != 3 or qd[2] != kv * rep * hd or not _only_reader(q, r0):
        return None
    uses = n.outputs[0].uses()
    if len(uses) != 1:
        return None
    o1 = uses[0].node
    t2 = _next(o1, "Reshape")
    o2 = _next(t2, "Transpose") if t2 is not None else None
    if o2 is None or o2.op_type != "Reshape" or transpose_perm(t2) != (0, 2, 3, 1, 4):
        return None
    bias = n.inputs[5] if len(n.inputs) > 5 else None
    tile = bias.producer() if bias is not None else None
    if bias is not None and (tile is None or tile.op_type != "Tile" or const_ints(tile.inputs[1]) != [1, 1, rep, 1]):
        return None
    return q, (r0, t1, r1), (o1, t2, o2), tile, kv, rep, hd


def _bias_by_query(graph, bias, rep: int, cache: dict):
    """``bias [B|1, 1, T, L]`` with each row repeated rep times in place (row t·rep + r = row t), made once per bias."""
    key = (id(bias), rep)
    if key not in cache:
        new = Nodes()
        x = new.op("Unsqueeze", bias, new.const(np.array([3], dtype=np.int64)))  # [B|1, 1, T, 1, L]
        x = new.op("Expand", x, new.const(np.array([1, 1, 1, rep, 1], dtype=np.int64)))  # [B|1, 1, T, rep, L]
        shape = new.op("Concat", new.op("Shape", bias, end=2), new.const(np.array([-1], dtype=np.int64)),
                       new.op("Shape", bias, start=3), axis=0)
        cache[key] = new.op("Reshape", x, shape)  # [B|1, 1, T·rep, L]
        producer = bias.producer()
        if producer is not None:
            graph.insert_after(producer, new.nodes)
        else:
            graph.insert_before(next(iter(graph)), new.nodes)
    return cache[key]


def query_heads_in_group_order(graph) -> int:
    """Rewrite each grouped MultiHeadAttention's transposed stacking into the view form (module doc), with its
    query and output projections' heads reordered. Returns the number of attentions rewritten."""
    done, biases = 0, {}
    for n in [n for n in graph if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]:
        st = _stacking(n)
        if st is None:
            continue
        q, qnodes, onodes, tile, kv, rep, hd = st
        heads = kv * rep
        edits, ok = _trace_back(q, hd)
        w_o = _trace_forward(onodes[2].outputs[0], heads, hd) if ok else None
        if w_o is None:
            continue
        order = _slot_order(heads, rep)
        for const, axis, offset, unit in edits:
            _permute(const, axis, offset, unit, order)
        _permute(w_o, 0, 0, hd, order)
        new = Nodes()
        q2 = new.op("Reshape", q, new.const(np.array([0, -1, kv * hd], dtype=np.int64)))  # [B, T·rep, H_kv·hd]
        graph.insert_before(n, new.nodes)
        n.replace_input_with(0, q2)
        if tile is not None:
            n.replace_input_with(5, _bias_by_query(graph, tile.inputs[0], rep, biases))
        out = Nodes()
        o = out.op("Reshape", n.outputs[0], out.const(np.array([0, -1, heads * hd], dtype=np.int64)))  # [B, T, H·hd]
        graph.insert_after(n, out.nodes)
        replace_value(graph, onodes[2].outputs[0], o)
        remove_dead(graph, list(reversed(onodes)))
        remove_dead(graph, list(reversed(qnodes)) + [tile])
        done += 1
    return done


__all__ = ["query_heads_in_group_order"]
