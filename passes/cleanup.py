"""cleanup: Constant nodes lifted to initializers, constant folding, shape-computation chains
folded (their static elements, also on graphs with dynamic dims: see ``_shapes``), identity
removal, common-subexpression elimination and dead-code removal.

On ONNX it runs onnx_ir's and onnxscript's own passes to a fixpoint and counts what each removed;
on FX it removes dead nodes and no-op aliases. Exact: outputs are bit-identical, except that
constant folding computes a folded value once at compile time (the same math).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer as opt
import torch

from effc.errors import PassOptionError
from effc.ir.sites import COMPRESSED
from effc.pass_base import Pass, PassResult
from effc.passes._shapes import fold_shape_chains
from effc.registry import register

# FX ops that return their input unchanged in an inference graph.
_FX_NOOPS = {
    torch.ops.aten.alias.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.dropout.default,
    torch.ops.aten.lift_fresh_copy.default,
}


# Ops whose constant inputs are a storage format (quantized codes, packed weights): folding them
# would store the weights dequantized.
_NEVER_FOLD = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulNBits"}
# Weights up to this many elements are folded through layout ops (Slice/Concat/Transpose of an
# LSTM's weights, say); onnxscript's own output limit keeps a fold from growing the model.
_FOLD_INPUT_LIMIT = 1 << 24
_SMALL_FILL = 1 << 16  # ConstantOfShape outputs folded up to this many elements


def _keep_compressed(node: ir.Node) -> bool | None:
    """Do not fold ops on compressed weights (e.g. the Transpose of a quantized tied lm_head):
    the folded copy would lose its weight site, and with it the quantization record. Nor Q/DQ
    and other ops of non-default domains: their constant inputs are a storage format."""
    if node.op_type in _NEVER_FOLD or node.domain not in ("", "ai.onnx"):
        return False
    if any(v is not None and v.metadata_props.get(COMPRESSED) for v in node.inputs):
        return False
    if node.op_type == "ConstantOfShape":  # onnxscript keeps them all; fold the small ones
        shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
        return shape is not None and int(np.prod(shape.numpy())) <= _SMALL_FILL
    return None


class _IdentityElimination(common.IdentityEliminationPass):
    """onnx_ir's pass, except that it keeps an Identity making a value of an outer graph the
    output of a subgraph (If/Loop bodies, e.g. Silero VAD's): the upstream pass moves that value
    into the subgraph's outputs and fails ("already an output of a different graph")."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        x = node.inputs[0] if len(node.inputs) == 1 else None
        y = node.outputs[0] if len(node.outputs) == 1 else None
        if x is not None and y is not None and y.is_graph_output():
            producer = x.producer()
            home = producer.graph if producer is not None else x.graph
            if home is not node.graph:
                return False
        return super()._try_eliminate_identity_node(node)


def fold_constants(model: ir.Model) -> None:
    # onnxscript logs a warning for every fold its reference evaluator cannot compute (the node is
    # then kept): not the user's concern
    log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        _fold(model)
    finally:
        log.setLevel(level)


def _fold(model: ir.Model) -> None:
    opt.fold_constants(
        model,
        onnx_shape_inference=True,
        should_fold=_keep_compressed,
        input_size_limit=_FOLD_INPUT_LIMIT,
    )


@register
class Cleanup(Pass):
    """Lift Constant nodes, fold constants and shape chains (dynamic dims too), drop identities,
    dead code and duplicates."""

    name = "cleanup"

    @dataclass
    class Options:
        max_iter: int = 5

    def validate(self) -> None:
        if self.options.max_iter < 1:
            raise PassOptionError(
                f"pass 'cleanup': option 'max_iter' must be >= 1, got {self.options.max_iter}"
            )

    def run(self, model, ctx) -> PassResult:
        if model.kind == "fx":
            return self._run_fx(model)
        steps = {
            "constants_lifted": common.LiftConstantsToInitializersPass(
                lift_all_constants=True, size_limit=0
            ),
            "constants_folded": fold_constants,
            "shape_chains_folded": fold_shape_chains,
            "identities_removed": _IdentityElimination(),
            "duplicates_removed": common.CommonSubexpressionEliminationPass(),
            "dead_nodes_removed": common.RemoveUnusedNodesPass(),
        }
        graph = model.model.graph
        stats = dict.fromkeys(steps, 0)
        start = len(list(graph.all_nodes()))
        for _ in range(self.options.max_iter):
            before_round = len(list(graph.all_nodes()))
            for key, step in steps.items():
                n0 = len(list(graph.all_nodes()))
                rewrites = step(model.model)
                # a rewrite count where the step gives one (its nodes die in dead-code removal)
                removed = n0 - len(list(graph.all_nodes()))
                stats[key] += rewrites if isinstance(rewrites, int) else removed
            if len(list(graph.all_nodes())) == before_round:
                break
        for tidy in (common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()):
            tidy(model.model)
        stats["nodes_removed"] = start - len(list(graph.all_nodes()))
        return PassResult(model, stats["nodes_removed"] > 0, stats)

    def _run_fx(self, model) -> PassResult:
        gm = model.graph_module
        removed = 0
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _FX_NOOPS and node.args:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
        n0 = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        dead = n0 - len(gm.graph.nodes)
        if removed or dead:
            gm.recompile()
            model.graph_module = gm
        return PassResult(
            model, bool(removed or dead), {"noops_removed": removed, "dead_nodes_removed": dead}
        )
