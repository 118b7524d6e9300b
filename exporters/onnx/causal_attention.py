"""Full-attention graphs: each fused attention over the grown KV cache as one standard ``Attention`` (ONNX opset 23).

The form of every full-attention export (measured against the MultiHeadAttention form it replaced, side by side on one
H100 in session 14, docs/benchmarks.md: chunk step with CUDA graphs 6.59 -> 6.14 ms at B = 8, 2.35 -> 2.28 ms at
B = 1; streaming an 8,192-token document 116k -> 154k tokens/s; attention at past 7,680 4.10 -> 2.07 ms per step;
CUDA verify unchanged, worst relative error 3.0e-3 fp16 / 1.3e-5 fp32).

After ``optimize_for_ort`` a full-attention layer reads its keys (values likewise) as

    present.i.key = Concat(past_key_values.i.key, Transpose(k [B, T, H_kv, hd], perm 0213), axis 2)   # a graph output
    MultiHeadAttention(q [B, T, H·hd], Reshape(Transpose(RepeatKV(present.i.key))), ..., bias = the causal mask)

where RepeatKV (Unsqueeze, Expand, Reshape) copies each of the H_kv heads rep = H / H_kv times. ``causal_attention``
rewrites that into

    Y, present.i.key, present.i.value = Attention(q, Reshape(k, [B, T, H_kv·hd]), Reshape(v, ...), <no mask>,
                                                  past_key_values.i.key, past_key_values.i.value,
                                                  q_num_heads=H, kv_num_heads=H_kv, is_causal=1, scale=<the MHA's>)

ONNX's ``Attention`` groups the query heads itself (head h reads key/value head h // rep, transformers' repeat_kv),
appends the new keys and values to the past to make ``present`` (the same Concat), and with ``is_causal=1`` masks
bottom-right: query i attends key j iff j <= i + P (P = the past length). That is exactly the traced mask of a
full-attention step (``decoder.attention_mask`` without a window: key j at absolute position ``position - P + j`` is
allowed iff it is not after the query and not negative), because in a full-attention state ``position`` is the past
length: both start at 0 and every step adds the chunk length to both. So no mask tensor is built, no repeat-KV copy
of the cache is made, and onnxruntime's CUDA kernel for the op (fp16: flash attention with the KV cache) skips the
masked half of the scores and appends the new keys and values to the cache in one kernel (the two Transposes and
two Concats per layer of the MultiHeadAttention form). Window graphs (a mask with a window and sinks) keep the
MultiHeadAttention forms of ``attention_forms``.

The op needs opset 23: the rewrite raises the model's ONNX opset import to 23. Every other operator of these graphs
is unchanged from opset 18 to 23 but for the element types it accepts, and onnxruntime 1.31.1's CUDA provider has
kernels for each at opset 23 (read from its library's kernel registrations: Cast, Reshape, Shape, Squeeze,
Unsqueeze, Transpose, Identity, ConstantOfShape and Size 23-24; Cos, Sin and Conv 22+; Equal 19+; Attention 23 and
24+), so no node falls back to the CPU.

Precision: onnxruntime's CUDA kernel (flash attention, fp16) keeps the scores and the softmax in fp32, like
MultiHeadAttention and torch's SDPA. Its CPU kernel rounds to fp16 inside the op in fp16 graphs (relative error
1.0e-3 against 2.1e-4 for MultiHeadAttention on the same inputs, 1.31.1); fp32 graphs are exact on both.
"""
from __future__ import annotations

import numpy as np

from .ir_nodes import Nodes, replace_value
from .ir_values import const_ints, dims, remove_dead, sole_producer, transpose_perm

OPSET = 23  # the first opset with Attention


def _cache_concat(c):
    """(past graph input, new [B, T, H_kv, hd]) when ``c`` is a graph output made by Concat(past, Transpose(new,
    perm 0213), axis 2), else None."""
    p = c.producer() if c is not None else None
    if p is None or p.op_type != "Concat" or len(p.inputs) != 2 or not c.is_graph_output():
        return None
    axis = p.attributes.get("axis")
    past, t = p.inputs
    tp = t.producer()
    if axis is None or axis.value not in (2, -2) or not past.is_graph_input() or tp is None \
            or tp.op_type != "Transpose" or transpose_perm(tp) != (0, 2, 1, 3) or len(t.uses()) != 1:
        return None
    new = tp.inputs[0]
    if dims(new) is None or len(dims(new)) != 4 or dims(past) is None or len(dims(past)) != 4:
        return None
    return past, new


def _cache_of(v, heads: int):
    """(present value, rep, repeat-KV nodes) when the MultiHeadAttention key/value input ``v`` is
    ``Reshape(Transpose(X, perm 0213))`` with X the cache concatenation itself (rep = 1) or its repeat-KV copy
    ``Reshape(Expand(Unsqueeze(C, [2]), ...))`` (rep = heads / H_kv), else None."""
    r = sole_producer(v, "Reshape")
    t = sole_producer(r.inputs[0], "Transpose") if r is not None else None
    if t is None or transpose_perm(t) != (0, 2, 1, 3):
        return None
    x, chain = t.inputs[0], [r, t]
    rr = sole_producer(x, "Reshape")
    e = sole_producer(rr.inputs[0], "Expand") if rr is not None else None
    u = sole_producer(e.inputs[0], "Unsqueeze") if e is not None else None
    if u is not None and const_ints(u.inputs[1] if len(u.inputs) > 1 else None) == [2]:
        x, chain = u.inputs[0], chain + [rr, e, u]
    d = dims(x)
    if d is None or len(d) != 4 or not isinstance(d[1], int) or d[1] < 1 or heads % d[1]:
        return None
    return x, heads // d[1], chain


def _query_heads(q):
    """(X [B, T, H, hd], nodes) when the query ``q`` is ``Reshape(Transpose(Transpose(X, perm 0213), perm 0213))``
    (the traced move of the heads in front of the positions and back: the identity), else None."""
    def made_by(v, op):
        p = v.producer() if v is not None else None
        return p if p is not None and p.op_type == op else None

    r = made_by(q, "Reshape")  # the Transposes may have other readers (the mask's shape): left to the caller's pass
    t2 = made_by(r.inputs[0], "Transpose") if r is not None else None
    t1 = made_by(t2.inputs[0], "Transpose") if t2 is not None else None
    if t1 is None or transpose_perm(t1) != (0, 2, 1, 3) or transpose_perm(t2) != (0, 2, 1, 3):
        return None
    x = t1.inputs[0]
    return (x, [r, t2, t1]) if dims(x) is not None and len(dims(x)) == 4 else None


def causal_attention(model) -> int:
    """Rewrite every fused MultiHeadAttention of a full-attention graph (module doc) into ONNX ``Attention``; raises
    the model's opset to 23 when it rewrote any. Only for graphs whose attention mask is the causal one over
    cat(past, chunk) with position = past length (full attention, no window, no sinks): the mask is dropped, not
    read. Returns the number of nodes rewritten."""
    import onnx_ir as ir

    graph, done = model.graph, 0
    for n in list(graph):
        if n.op_type != "MultiHeadAttention" or n.domain != "com.microsoft":
            continue
        ins = list(n.inputs) + [None] * (8 - len(n.inputs))
        heads = n.attributes["num_heads"].value if "num_heads" in n.attributes else None
        if not isinstance(heads, int) or any(ins[i] is not None for i in (3, 4, 6, 7)) or len(n.outputs) != 1:
            continue
        k, v = _cache_of(ins[1], heads), _cache_of(ins[2], heads)
        ck, cv = (_cache_concat(k[0]) if k else None), (_cache_concat(v[0]) if v else None)
        qd = dims(ins[0])
        if ck is None or cv is None or k[1] != v[1] or qd is None or len(qd) != 3:
            continue
        kv = heads // k[1]
        new = Nodes()
        qh = _query_heads(ins[0])
        flat = [new.op("Reshape", x, new.const(np.array([0, 0, -1], dtype=np.int64)))
                for x in ((qh[0],) if qh else ()) + (ck[1], cv[1])]
        q, flat = (flat[0], flat[1:]) if qh else (ins[0], flat)
        attrs = [ir.AttrInt64("q_num_heads", heads), ir.AttrInt64("kv_num_heads", kv), ir.AttrInt64("is_causal", 1),
                 ir.AttrInt64("softmax_precision", int(ir.DataType.FLOAT))]  # fp32 softmax (SDPA's); CPU ignores it
        if "scale" in n.attributes:
            attrs.append(ir.AttrFloat32("scale", float(n.attributes["scale"].value)))
        att = ir.Node("", "Attention", [q, flat[0], flat[1], None, ck[0], cv[0]], attributes=attrs,
                      num_outputs=3)
        new.nodes.append(att)
        graph.insert_before(n, new.nodes)
        replace_value(graph, n.outputs[0], att.outputs[0])
        graph.remove(n, safe=True)
        for chain in (k[2], v[2], qh[1] if qh else []):
            remove_dead(graph, chain)
        for old, out in ((k[0], att.outputs[1]), (v[0], att.outputs[2])):
            concat, name = old.producer(), old.name
            moved = concat.inputs[1].producer()  # the Transpose of the new keys (values) into the cache layout
            graph.outputs[[o is old for o in graph.outputs].index(True)] = out  # a graph output (_cache_concat)
            replace_value(graph, old, out)
            remove_dead(graph, [concat, moved])
            out.name = name  # the graph output keeps its name (present.i.key / .value)
        done += 1
    if done:
        model.opset_imports[""] = max(OPSET, model.opset_imports.get("", OPSET))
    return done


__all__ = ["causal_attention", "OPSET"]
