"""tvm-legalize: the last pass before TVM's relax ONNX importer (the ``tvm`` target appends it).

TVM 0.27's importer wants a graph with static shapes and constant shape arithmetic; third-party
files fail it in several ways, each fixed here:

- symbolic input dims are fixed (``--shape``, else effc's default rule: batch 1, images
  3x64x64, other dims 16), and the report lists what was fixed;
- ``Constant`` nodes become initializers (the importer reads only ``value``, not ``value_float``
  / ``value_ints`` / ...: "no value in Constant");
- shape computations (Shape -> Gather -> Concat -> Reshape, ...) are folded with ONNX shape
  inference on the now static shapes ("requires the input new shape to be Shape", "Reshape
  expects the input tensor to have known shape");
- ``Resize`` gets explicit inputs: an empty ``roi`` becomes no roi, empty ``scales`` beside
  ``sizes`` are dropped, and static ``sizes`` or ``scales`` are written as constants ("object of
  type 'NoneType' has no len()").

Exact: nothing is computed differently (folding evaluates the same shape math once).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from effc.inputs import resolve_shape
from effc.ir.model import InputSpec
from effc.pass_base import Pass, PassResult
from effc.passes.cleanup import fold_constants
from effc.registry import register


def _static_inputs(model: ir.Model, shapes: dict[str, list[int]]) -> list[str]:
    """Give every graph input a static shape; return the dims fixed, as "name[i]=value"."""
    fixed = []
    for value in model.graph.inputs:
        if value.shape is None or all(isinstance(d, int) for d in value.shape):
            continue
        spec = InputSpec(
            value.name,
            [d if isinstance(d, int) else str(d) for d in value.shape],
            value.dtype.numpy().name if value.dtype is not None else "float32",
        )
        dims = resolve_shape(spec, shapes)
        fixed += [
            f"{value.name}[{i}]={n}"
            for i, (d, n) in enumerate(zip(value.shape, dims))
            if not isinstance(d, int)
        ]
        value.shape = ir.Shape(dims)
    return fixed


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    return None


def _resize_inputs(graph: ir.Graph, opset: int) -> int:
    """Omit empty roi / scales inputs of Resize nodes (ONNX writes them as "" or as empty
    constants); return how many nodes changed. Before opset 13, roi and scales are required
    inputs (an empty name there is an invalid graph): those Resizes stay as they are (TVM's
    importer reads their empty constants; measured on ddddocr's YOLOX detector, opset 11)."""
    if opset < 13:
        return 0
    changed = 0
    for node in list(graph.all_nodes()):
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
            continue
        before = list(node.inputs)
        for i in (1, 2):
            if i < len(node.inputs) and node.inputs[i] is not None:
                c = _const(node.inputs[i])
                if c is not None and c.size == 0:
                    node.replace_input_with(i, None)
        n = len(node.inputs)
        while n > 1 and node.inputs[n - 1] is None:
            n -= 1
        node.resize_inputs(n)
        changed += list(node.inputs) != before
    return changed


@register
class TVMLegalize(Pass):
    """TVM-importable ONNX: static shapes, folded shape math, plain Constants and Resizes."""

    name = "tvm-legalize"
    kinds = ("onnx",)

    def run(self, model, ctx) -> PassResult:
        m = model.model
        shapes = {k: list(v) for k, v in (ctx.shapes or {}).items()}
        stats: dict = {"static_dims": _static_inputs(m, shapes)}
        n0 = len(list(m.graph.all_nodes()))
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(m)
        stats["constants_lifted"] = n0 - len(list(m.graph.all_nodes()))
        stats["resize_rewritten"] = _resize_inputs(m.graph, m.opset_imports.get("", 1))
        fold_constants(m)
        common.RemoveUnusedNodesPass()(m)
        stats["nodes_folded"] = n0 - stats["constants_lifted"] - len(list(m.graph.all_nodes()))
        changed = bool(stats["static_dims"] or stats["constants_lifted"] or stats["nodes_folded"])
        return PassResult(model, changed or bool(stats["resize_rewritten"]), stats)
