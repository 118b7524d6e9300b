"""Splits along the last axis only: onnxruntime's CUDA Split uploads four small arrays per call otherwise.

Each layer splits RoPE's output [B, T, H + H_kv, hd] into the query and key heads along axis 2. For a split that
is not along the last axis, with unequal sizes, onnxruntime's CUDA kernel (``_SplitKernel``) stages its output
pointers, sizes, size ranges and an axis-to-output map in pinned host memory and copies them to the device on
every call: 4 host-to-device copies, each a node of a captured CUDA graph. The session-7 profile counted 120
host-to-device copies per SmolLM2 step, 4 per layer, replayed at about 0.8-0.9 µs per graph node
(docs/benchmarks.md); that they are this split's is inferred from the count and onnxruntime's source (its Concat
passes its arrays by value), not traced. Along the last axis, with few outputs, the kernel
(``_SplitSmallInnerKernel``) takes them as kernel arguments, as it already does for the layer's other split
([q·k | v] of the projection).

So ``splits_on_last_axis`` writes a split of X [d0, .., da, .., dr] along a < r, whose trailing dims are static, as

    Reshape(X, [0, .., 0, -1])  ->  Split along the (now last) axis, sizes s_i · prod(d_{a+1..r})
                                ->  Reshape each part to [0, .., 0, s_i, d_{a+1}, .., d_r]

The same bytes in the same order: a Reshape is a view in onnxruntime, so the form adds no kernel and no copy.
"""
from __future__ import annotations

import math

import numpy as np

from .ir_nodes import Nodes, replace_value
from .ir_values import shape_of, split_sizes


def splits_on_last_axis(graph) -> int:
    """Rewrite every Split along an inner axis with static trailing dims (module doc); returns how many."""
    import onnx_ir as ir

    done = 0
    for n in [n for n in graph if n.op_type == "Split" and n.domain in ("", "ai.onnx")]:
        d = shape_of(n.inputs[0])
        ss = split_sizes(n, len(d)) if d is not None else None
        if ss is None:
            continue
        axis, sizes = ss
        inner = d[axis + 1:]
        if axis == len(d) - 1 or len(sizes) != len(n.outputs) or not all(isinstance(x, int) and x > 0 for x in inner):
            continue
        unit = math.prod(inner)
        new = Nodes()

        def ints(values):
            return new.const(np.asarray(values, dtype=np.int64))

        flat = new.op("Reshape", n.inputs[0], ints([0] * axis + [-1]))
        split = ir.Node("", "Split", [flat, ints([s * unit for s in sizes])], attributes=[ir.AttrInt64("axis", axis)],
                        num_outputs=len(sizes))
        new.nodes.append(split)
        parts = [new.op("Reshape", o, ints([0] * axis + [s] + inner)) for o, s in zip(split.outputs, sizes)]
        graph.insert_before(n, new.nodes)
        for old, part in zip(n.outputs, parts):
            replace_value(graph, old, part)
        graph.remove(n, safe=True)
        done += 1
    return done


__all__ = ["splits_on_last_axis"]
