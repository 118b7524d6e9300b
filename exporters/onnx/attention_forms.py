"""Rewrites of the fused ``com.microsoft.MultiHeadAttention`` nodes into forms onnxruntime runs with fewer copies.

Both are exact (the same arithmetic on the same values) and run after ``optimize_for_ort`` made the nodes:

- ``attention_without_transposes``: key and value enter as 4-D [B, N, L, hd] (the KV cache's own layout)
  instead of being transposed to [B, L, N·hd];
- ``grouped_queries``: with grouped-query attention (H query heads, H_kv < H key/value heads) the attention
  reads the H_kv cached heads directly instead of a repeat-KV copy of the whole cache (an ``Expand`` of the
  past keys and values to H heads, every layer, every step). The rep = H / H_kv query heads that share a
  key/value head are stacked along the query axis (a query tensor of rep·T rows per KV head), and the
  attention bias is tiled to match once per step:

      q [B, T, H·hd] -> [B, T, H_kv, rep, hd] -> [B, rep, T, H_kv, hd] -> [B, rep·T, H_kv·hd]
      MHA(num_heads=H_kv, q, k [B, H_kv, L, hd], v [B, H_kv, L, hd], bias tiled to [B|1, 1, rep·T, L])
      out [B, rep·T, H_kv·hd] -> [B, rep, T, H_kv, hd] -> [B, T, H_kv, rep, hd] -> [B, T, H·hd]

  Query head h = g·rep + r uses key/value head g (transformers' ``repeat_kv``), and row r·T + i of the stacked
  query is query i of head g·rep + r, so every score and every output is the one repeat-KV gives. The two query
  transposes move T·H·hd values per layer; the Expand they replace moved H·L·hd twice (L = past + chunk).
"""
from __future__ import annotations

import numpy as np

from .ir_nodes import Nodes, replace_value
from .ir_values import const_ints, dims, remove_dead, sole_producer


def _bnsh_source(v):
    """X when ``v = Reshape(Transpose(X, perm=[0, 2, 1, 3]), 3-D shape)`` and nothing else reads that Reshape;
    else None. (The form the MultiHeadAttention fusion gives its inputs: heads moved back behind positions.)"""
    r = sole_producer(v, "Reshape")
    t = sole_producer(r.inputs[0], "Transpose") if r is not None else None
    if t is None:
        return None
    perm = t.attributes.get("perm")
    x = t.inputs[0]
    if perm is None or tuple(perm.value) != (0, 2, 1, 3) or x.shape is None or len(x.shape) != 4:
        return None
    return x


def _plain_mha_nodes(graph):
    """The fused MultiHeadAttention nodes with no packed bias, key padding mask or past inputs (the fusion makes
    none), as (node, its 8 inputs padded with None)."""
    for n in list(graph):
        if n.op_type != "MultiHeadAttention" or n.domain != "com.microsoft":
            continue
        ins = list(n.inputs) + [None] * (8 - len(n.inputs))
        if ins[3] is None and ins[4] is None and ins[6] is None and ins[7] is None:
            yield n, ins


def attention_without_transposes(graph) -> int:
    """Feed each fused MultiHeadAttention its key and value as 4-D [B, N, L, hd] (BNSH, the layout of the KV cache
    after repeat-KV), instead of transposing them to [B, L, N·hd]: onnxruntime reads that form in place (format
    Q_K_V_BSNH_BNSH_BNSH; its fused kernels take the BNSH strides, no copy; cuDNN's flash SDPA on the H200), so 2
    Transpose kernels per layer go. (The query's transpose to [B, N, S, hd] and back cancel in onnxruntime's
    transpose optimizer.) Returns the number of nodes rewritten."""
    done = 0
    for n, ins in _plain_mha_nodes(graph):
        k, v = _bnsh_source(ins[1]), _bnsh_source(ins[2])
        if k is None or v is None:
            continue
        old = [ins[1].producer(), ins[2].producer()]
        n.replace_input_with(1, k)
        n.replace_input_with(2, v)
        for r in old:  # the now-unused Reshape, then its Transpose
            remove_dead(graph, [r, r.inputs[0].producer()])
        done += 1
    return done


def _repeat_kv_source(v, heads: int):
    """(X, rep) when ``v = Reshape(Expand(Unsqueeze(X, axis 2), ...), ...)`` is X [B, H_kv, L, hd] with each head
    repeated rep = heads / H_kv times ([B, heads, L, hd], the same B, L and hd: transformers' repeat_kv), else None."""
    r = sole_producer(v, "Reshape")
    e = sole_producer(r.inputs[0], "Expand") if r is not None else None
    if e is None:
        return None
    u = e.inputs[0].producer()
    if u is None or u.op_type != "Unsqueeze" or const_ints(u.inputs[1] if len(u.inputs) > 1 else None) != [2]:
        return None
    x = u.inputs[0]
    xd, vd = dims(x), dims(v)
    if xd is None or vd is None or len(xd) != 4 or len(vd) != 4 or not isinstance(xd[1], int) or vd[1] != heads:
        return None
    if xd[1] < 1 or heads % xd[1] or (xd[0], xd[2], xd[3]) != (vd[0], vd[2], vd[3]) or not isinstance(xd[3], int):
        return None
    return x, heads // xd[1]


def grouped_queries(graph) -> int:
    """Rewrite each fused MultiHeadAttention over repeat-KV key/value (see the module doc) to attend with the H_kv
    cached heads directly, the query heads of a group stacked along the query axis. Needs the key and value in
    [B, N, L, hd] form (``attention_without_transposes`` first) and an attention bias without a head axis (or
    none). Returns the number of nodes rewritten."""
    tiled = {}  # one tiled bias per (bias value, rep), shared by the layers
    done = 0
    for n, ins in _plain_mha_nodes(graph):
        heads = n.attributes["num_heads"].value if "num_heads" in n.attributes else None
        if not isinstance(heads, int):
            continue
        k, v = _repeat_kv_source(ins[1], heads), _repeat_kv_source(ins[2], heads)
        bias, qd = ins[5], dims(ins[0])
        if k is None or v is None or k[1] != v[1] or k[1] < 2 or qd is None or len(qd) != 3 or (bias is not None and (
                dims(bias) is None or len(dims(bias)) != 4 or dims(bias)[1] != 1)):
            continue
        if bias is not None:
            bias = _tiled_bias(graph, _without_broadcast(bias), k[1], tiled)
        _stack_query_heads(graph, n, ins, k[0], v[0], bias, heads, k[1])
        done += 1
    return done


def _tiled_bias(graph, bias, rep: int, cache: dict):
    """``Tile(bias, [1, 1, rep, 1])``: the bias rows for the stacked queries, made once per bias value (cached)."""
    key = (id(bias), rep)
    if key not in cache:
        new = Nodes()
        cache[key] = new.op("Tile", bias, new.const(np.array([1, 1, rep, 1], dtype=np.int64)))
        producer = bias.producer()
        if producer is not None:
            graph.insert_after(producer, new.nodes)
        else:  # a graph input: before the first node
            graph.insert_before(next(iter(graph)), new.nodes)
    return cache[key]


def _stack_query_heads(graph, n, ins, xk, xv, bias, heads: int, rep: int) -> None:
    """Replace the MultiHeadAttention ``n`` by one over the H_kv heads xk, xv with the query heads stacked (module
    doc), and remove the repeat-KV copies and the bias broadcast it read."""
    import onnx_ir as ir

    kv, hd = heads // rep, dims(xk)[3]
    new = Nodes()

    def const(values):
        return new.const(np.asarray(values, dtype=np.int64))

    q = new.op("Reshape", ins[0], const([0, 0, kv, rep, hd]))  # [B, T, H_kv, rep, hd]
    q = new.op("Transpose", q, perm=[0, 3, 1, 2, 4])  # [B, rep, T, H_kv, hd]
    q = new.op("Reshape", q, const([0, -1, kv * hd]))  # [B, rep·T, H_kv·hd]
    attrs = [a for name, a in n.attributes.items() if name != "num_heads"] + [ir.AttrInt64("num_heads", kv)]
    mha = ir.Node("com.microsoft", "MultiHeadAttention", [q, xk, xv, None, None, bias], attributes=attrs, num_outputs=1)
    new.nodes.append(mha)
    o = new.op("Reshape", mha.outputs[0], const([0, rep, -1, kv, hd]))  # [B, rep, T, H_kv, hd]
    o = new.op("Transpose", o, perm=[0, 2, 3, 1, 4])  # [B, T, H_kv, rep, hd]
    o = new.op("Reshape", o, const([0, 0, heads * hd]))  # [B, T, H·hd]
    graph.insert_before(n, new.nodes)
    replace_value(graph, n.outputs[0], o)
    old = [ins[1].producer(), ins[2].producer()]
    graph.remove(n, safe=True)
    for r in old:  # Reshape, Expand, Unsqueeze of the repeat-KV copy
        e = r.inputs[0].producer()
        remove_dead(graph, [r, e, e.inputs[0].producer()])
    remove_dead(graph, [ins[5].producer() if ins[5] is not None else None])  # the bias's Expand


def _without_broadcast(v):
    """X when ``v = Expand(X, shape)`` and X already has v's shape (the exporter broadcasts the attention mask to
    its own shape once per layer: a copy each), else v."""
    p = v.producer()
    if p is not None and p.op_type == "Expand" and dims(p.inputs[0]) is not None and dims(p.inputs[0]) == dims(v):
        return p.inputs[0]
    return v


__all__ = ["attention_without_transposes", "grouped_queries"]
