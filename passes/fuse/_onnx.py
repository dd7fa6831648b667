"""Small onnx_ir helpers shared by the graph rules that are not single patterns (chains of any
length, rules that need array math on constants)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass


def const(value: ir.Value | None) -> np.ndarray | None:
    """The constant array behind ``value`` (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = tuple(value.shape)
    return dims if all(isinstance(d, int) for d in dims) else None


def only_user(value: ir.Value) -> ir.Node | None:
    """The single consuming node of ``value`` (used once, not a graph output), else None."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """A new initializer with a fresh name derived from ``base``."""
    names = set(graph.initializers)
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a scalar into 1-d)
        array = array.copy(order="C")
    value = ir.Value(name=name, const_value=ir.tensor(array))

    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def like(new: ir.Value, old: ir.Value) -> ir.Value:
    """Give ``new`` the shape and type of ``old``, where ``old`` has them."""
    if old.shape is not None:
        new.shape = old.shape
    if old.dtype is not None:
        new.dtype = old.dtype
    return new


def replace(old: ir.Value, new: ir.Value) -> None:
    """Point every use of ``old`` (graph outputs included) at ``new``, keeping the output name
    and (where ``new`` has none) its shape and type."""
    if new.shape is None or new.dtype is None:
        like(new, old)
    if old.is_graph_output():
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name, new.name = f"{name}__replaced", name
    else:
        old.replace_all_uses_with(new)


def insert(graph: ir.Graph, before: ir.Node, node: ir.Node) -> ir.Value:
    graph.insert_before(before, node)
    return node.outputs[0]


class GraphRule:
    """A rule as a function over nodes: ``fire(graph, node) -> bool``; counts the firings,
    with the same ``apply_to_model`` surface as an onnxscript rule set."""

    def __init__(self, fire: Callable[[ir.Graph, ir.Node], bool]):
        self.fire = fire

    def apply_to_model(self, model: ir.Model) -> int:
        count = 0
        for node in list(model.graph):
            if node.graph is model.graph and self.fire(model.graph, node):
                count += 1
        if count:
            RemoveUnusedNodesPass()(model)
            model.graph.sort()  # a rule may read a value its node was inserted before

        return count
