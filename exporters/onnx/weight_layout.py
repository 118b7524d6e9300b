"""Transposed weights written as initializers of their own.

onnxruntime folds a ``Transpose`` of an initializer into a new constant when a session loads the graph, and that
constant belongs to the session. onnxscript's own folding at export leaves large ones alone (over its size limit),
so the lm head's Uᵀ stays a Transpose in the graph: for SmolLM2's tied unembedding U [49152, 576] (read as it is by
the token Gather and as Uᵀ by the logits MatMuls) every session made from the graph held its own [576, 49152] copy,
57 MB in fp16, 525 MB for a 128k-vocabulary 1B model. A static full-attention session opens one pinned session per
past length (16 for 8,192 tokens at C = 512), so 16 copies. ``pretransposed_weights`` replaces each such Transpose
with an initializer holding the transposed array, one of the weights the pinned sessions share
(``exporters/runtime/static.py``); the MatMul reads the same [D, V] layout as after onnxruntime's folding, so its
kernel does not change. The original initializer stays where something else reads it (the Gather).
"""
from __future__ import annotations

import numpy as np

from .ir_nodes import replace_value


def pretransposed_weights(graph) -> int:
    """Replace every ``Transpose`` of an initializer in ``graph`` (onnx_ir, in place) by an initializer holding the
    transposed values; drop initializers nothing reads any more. Returns how many Transposes were replaced."""
    import onnx_ir as ir

    done, made = 0, {}  # (weight, perm) -> its transposed initializer: two Transposes of one weight share it
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        w = node.inputs[0]
        if w is None or not w.is_initializer() or w.const_value is None or w.shape is None:
            continue
        perm = node.attributes.get("perm")
        perm = list(perm.value) if perm is not None else list(reversed(range(len(w.shape))))
        value = made.get((w.name, tuple(perm)))
        if value is None:
            arr = np.ascontiguousarray(np.asarray(w.const_value.numpy()).transpose(perm))
            name = f"{w.name}.transposed" if perm == [1, 0] else f"{w.name}.perm_{'_'.join(map(str, perm))}"
            value = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(w.dtype),
                             const_value=ir.tensor(arr, name=name))
            graph.register_initializer(value)
            made[(w.name, tuple(perm))] = value
        replace_value(graph, node.outputs[0], value)
        graph.remove(node, safe=True)
        if not w.uses() and not w.is_graph_output():
            graph.initializers.pop(w.name)
        done += 1
    return done


__all__ = ["pretransposed_weights"]
