"""Transposed (and cast) weights written as initializers of their own.

onnxruntime folds a ``Transpose`` of an initializer into a new constant when a session loads the graph, and that
constant belongs to the session. onnxscript's own folding at export leaves large ones alone (over its size limit),
so the lm head's Uᵀ stays a Transpose in the graph: for SmolLM2's tied unembedding U [49152, 576] (read as it is by
the token Gather and as Uᵀ by the logits MatMuls) every session made from the graph held its own [576, 49152] copy,
57 MB in fp16, 525 MB for a 128k-vocabulary 1B model. A static full-attention session opens one pinned session per
past length (16 for 8,192 tokens at C = 512), so 16 copies. The same holds for a Cast of an initializer: the FWL
head computes in fp32 and casts its fp16 weights W1, W2 (5.3 MB each in fp32) in every session. ``folded_weights``
replaces each such node with an initializer holding its result, one of the weights the pinned sessions share
(``exporters/runtime/static.py``); the consumers read the same values in the same layout as after onnxruntime's
folding, so their kernels do not change. The original initializer stays where something else reads it (U: the
Gather).
"""
from __future__ import annotations

import numpy as np

from .ir_nodes import replace_value


def _folded(node, w):
    """(key, name, array) of ``node`` applied to the initializer ``w`` when it is a Transpose or a float-to-float
    Cast, else None."""
    import onnx_ir as ir

    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Transpose", "Cast"):
        return None
    arr = np.asarray(w.const_value.numpy())  # read only for the nodes that fold (not for the token Gather of U)
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        perm = list(perm.value) if perm is not None else list(reversed(range(arr.ndim)))
        name = f"{w.name}.transposed" if perm == [1, 0] else f"{w.name}.perm_{'_'.join(map(str, perm))}"
        return ("Transpose", w.name, tuple(perm)), name, np.ascontiguousarray(arr.transpose(perm))
    if node.op_type == "Cast":
        to = ir.DataType(node.attributes["to"].value)
        if not (to.is_floating_point() and w.const_value.dtype.is_floating_point()):
            return None
        return ("Cast", w.name, to), f"{w.name}.{to.name.lower()}", arr.astype(to.numpy())
    return None


def folded_weights(graph) -> int:
    """Replace every ``Transpose`` or float-to-float ``Cast`` of an initializer in ``graph`` (onnx_ir, in place, in
    graph order, so a Cast of a Transpose folds too) by an initializer holding the result; drop initializers nothing
    reads any more. Returns how many nodes were replaced."""
    import onnx_ir as ir

    done, made = 0, {}  # (op, weight, attribute) -> its initializer: two such nodes on one weight share it
    for node in list(graph):
        w = node.inputs[0] if node.inputs else None
        if w is None or not w.is_initializer() or w.const_value is None:
            continue
        folded = _folded(node, w)
        if folded is None:
            continue
        key, name, arr = folded
        value = made.get(key)
        shape, typ = ir.Shape(arr.shape), ir.TensorType(ir.DataType.from_numpy(arr.dtype))
        if value is None:
            value = ir.Value(name=name, shape=shape, type=typ, const_value=ir.tensor(arr, name=name))
            graph.register_initializer(value)
            made[key] = value
        replace_value(graph, node.outputs[0], value)
        value.shape, value.type = shape, typ  # exact, whatever the graph recorded for the node's output
        graph.remove(node, safe=True)
        if not w.uses() and not w.is_graph_output():
            graph.initializers.pop(w.name)
        done += 1
    return done


__all__ = ["folded_weights"]
