"""Full-attention graphs: each grouped attention as onnxruntime's causal MultiHeadAttention over the past.

An experiment, off unless ``FWCONVERT_EXPERIMENT_CAUSAL_MHA=1`` is set at export: measured against the masked
form on the GPU before either is kept (docs/benchmarks.md, session 8, "Next steps").

Why: the masked form (query_order.py's view form) attends with an attention bias, so onnxruntime runs cuDNN's
flash kernel. At batch 1 and a long past that kernel reaches 69 TFLOP/s on an H200 (4.2 ms of a 6.7 ms step at
past 7,680). onnxruntime's own flash kernel is used only without a bias; it masks causally aligned bottom-right
(query i sees keys j <= i + L - T) and splits long key ranges over thread blocks when the grid is small. It needs
key and value with all H heads, so:

    q  [B, T, H·hd]          (the projection's output; heads in slot order s = r·H_kv + g, query_order.py)
    k  the chunk's keys [B, T, H_kv, hd] -> Tile [1, 1, rep, 1] -> Reshape [B, T, H·hd]  (head s uses s mod H_kv = g)
    past_key_values.i.key [B, H_kv, P, hd] -> Tile [1, rep, 1, 1] -> [B, H, P, hd]        (likewise)
    MHA(num_heads = H, q, k, v, past_key, past_value, unidirectional = 1) -> out [B, T, H·hd] (H heads' present: unread)

which is what the view form's attention and its output Reshape gave. Query i of the chunk attends keys j <= P + i:
the full-attention mask whenever the state's position equals the cache's length P, as it does for every state the
runtime makes (ChunkSession, StateBuffers). onnxruntime's CPU kernel computes the same (checked on 1.31.1 in fp32
and fp16 for P = 0, 5, 16 and T = 1, 4, 8), so the form is verified on the CPU like any other.

The MHA's own present outputs must stay in the graph: without them the CPU kernel reads past the new keys without
an error, and the CUDA kernel refuses the node. The cache's present.i.key|value (H_kv heads) are made as before.
The cost: the past's keys and values are copied rep times (the Tile) and once more by the MHA's own concatenation,
per layer and step.
"""
from __future__ import annotations

import os

import numpy as np

from .ir_nodes import Nodes, replace_value
from .ir_values import const_ints, dims, remove_dead, transpose_perm

EXPERIMENT_ENV = "FWCONVERT_EXPERIMENT_CAUSAL_MHA"


def wanted() -> bool:
    """Whether this export tries the causal form (the experiment switch above)."""
    return os.environ.get(EXPERIMENT_ENV, "") == "1"


def _chunk_keys(cache, hd: int):
    """(past input, the chunk's [B, T, H_kv, hd] values) of ``cache = Concat(past, Transpose(x, [0, 2, 1, 3]),
    axis=2)`` where ``past`` is a graph input, else None."""
    c = cache.producer() if cache is not None else None
    if c is None or c.op_type != "Concat" or len(c.inputs) != 2 or "axis" not in c.attributes:
        return None
    past, new = c.inputs
    if c.attributes["axis"].value not in (2, -2) or past is None or past.producer() is not None or new is None:
        return None
    t = new.producer()
    if t is None or t.op_type != "Transpose" or transpose_perm(t) != (0, 2, 1, 3):
        return None
    x = t.inputs[0]
    xd = dims(x)
    if xd is not None and (len(xd) != 4 or xd[3] != hd):
        return None
    return past, x


def _view_form(n):
    """(q [B, T, H·hd], k chunk, v chunk, past key, past value, output Reshape, H, rep, hd) of a view-stacked grouped
    MultiHeadAttention ``n`` (query_order.py's form, with its causal bias), else None."""
    ins = list(n.inputs) + [None] * (6 - len(n.inputs))
    heads_kv = n.attributes["num_heads"].value if "num_heads" in n.attributes else None
    kd = dims(ins[1])
    if len(n.inputs) > 6 or ins[3] is not None or ins[4] is not None or ins[5] is None or not isinstance(heads_kv, int) \
            or kd is None or len(kd) != 4 or not isinstance(kd[3], int):
        return None
    hd = kd[3]
    r = ins[0].producer() if ins[0] is not None else None
    if r is None or r.op_type != "Reshape" or const_ints(r.inputs[1]) != [0, -1, heads_kv * hd]:
        return None
    uses = n.outputs[0].uses()
    if len(uses) != 1 or uses[0].node.op_type != "Reshape":
        return None
    out = uses[0].node
    target = const_ints(out.inputs[1])
    if target is None or len(target) != 3 or target[:2] != [0, -1] or target[2] % (heads_kv * hd):
        return None
    heads = target[2] // hd
    k, v = _chunk_keys(ins[1], hd), _chunk_keys(ins[2], hd)
    if k is None or v is None:
        return None
    return r.inputs[0], k[1], v[1], k[0], v[0], out, heads, heads // heads_kv, hd


def causal_attention_over_past(graph) -> int:
    """Rewrite each view-stacked grouped attention of a full-attention graph into the causal form (module doc).
    Returns the number rewritten. Only for full attention: a window's mask is not causal over the whole past."""
    import onnx_ir as ir

    done = 0
    for n in [n for n in graph if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]:
        form = _view_form(n)
        if form is None:
            continue
        q, kc, vc, past_k, past_v, out, heads, rep, hd = form
        new = Nodes()

        def const(values):
            return new.const(np.asarray(values, dtype=np.int64))

        def chunk(x):  # [B, T, H_kv, hd] -> [B, T, H·hd], head s reading s mod H_kv
            return new.op("Reshape", new.op("Tile", x, const([1, 1, rep, 1])) if rep > 1 else x,
                          const([0, 0, heads * hd]))

        def past(x):  # [B, H_kv, P, hd] -> [B, H, P, hd]
            return new.op("Tile", x, const([1, rep, 1, 1])) if rep > 1 else x

        attrs = [a for name, a in n.attributes.items() if name not in ("num_heads", "unidirectional")]
        attrs += [ir.AttrInt64("num_heads", heads), ir.AttrInt64("unidirectional", 1)]
        mha = ir.Node("com.microsoft", "MultiHeadAttention",
                      [q, chunk(kc), chunk(vc), None, None, None, past(past_k), past(past_v)],
                      attributes=attrs, num_outputs=3)
        new.nodes.append(mha)
        graph.insert_before(n, new.nodes)
        replace_value(graph, out.outputs[0], mha.outputs[0])
        old_q, old_bias = n.inputs[0].producer(), n.inputs[5].producer()
        graph.remove(out, safe=True)
        graph.remove(n, safe=True)
        remove_dead(graph, [old_q, old_bias])
        done += 1
    return done


__all__ = ["EXPERIMENT_ENV", "causal_attention_over_past", "wanted"]
