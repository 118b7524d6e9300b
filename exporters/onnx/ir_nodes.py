"""Building the nodes of one graph rewrite (onnx_ir), in order, for ``graph.insert_before/after``.

    new = Nodes()
    y = new.op("Mul", x, new.const(np.array(2.0, np.float32)))      # -> the node's output value
    z = new.op("Transpose", y, perm=[0, 2, 1, 3])                    # attributes by Python type
    graph.insert_before(anchor, new.nodes)
"""
from __future__ import annotations

import numpy as np


def attribute(name: str, value):
    """An onnx_ir attribute from a Python value: int or ir.DataType -> INT, float -> FLOAT, a list/tuple of ints
    -> INTS, anything else (an ir tensor) -> TENSOR."""
    import onnx_ir as ir

    if isinstance(value, (ir.DataType, bool, int, np.integer)):
        return ir.AttrInt64(name, int(value))
    if isinstance(value, float):
        return ir.AttrFloat32(name, value)
    if isinstance(value, (list, tuple)):
        return ir.AttrInt64s(name, [int(v) for v in value])
    return ir.AttrTensor(name, value)


class Nodes:
    """The nodes one rewrite makes, in the order they must run."""

    def __init__(self):
        self.nodes = []

    def op(self, op_type: str, *inputs, domain: str = "", **attrs):
        """Append ``op_type(inputs, attrs)`` (one output) and return its output value."""
        import onnx_ir as ir

        node = ir.Node(domain, op_type, list(inputs), attributes=[attribute(k, v) for k, v in attrs.items()],
                       num_outputs=1)
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, arr):
        """A ``Constant`` holding ``arr`` (a numpy array)."""
        import onnx_ir as ir

        return self.op("Constant", value=ir.tensor(np.asarray(arr)))


def replace_value(graph, old, new) -> None:
    """Make every reader of ``old`` (and the graph's outputs) read ``new`` instead; ``new`` takes ``old``'s shape
    and type (a rewrite computes the same tensor)."""
    import onnx_ir as ir

    new.shape, new.type = old.shape, old.type
    ir.convenience.replace_all_uses_with(old, new)
    for i, out in enumerate(graph.outputs):
        if out is old:
            graph.outputs[i] = new


__all__ = ["Nodes", "attribute", "replace_value"]
