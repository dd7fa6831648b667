"""The two IR kinds a pass sees: ``FxModel`` (torch.fx via torch.export) and ``OnnxModel``.

Both expose the same small surface the pipeline, report and checker need: ``kind``, input
specs, ``run(inputs)`` on numpy arrays, op histogram, parameter count and bytes. Weight-level
passes edit ``FxModel.module`` (the user's nn.Module) in place; structural FX passes edit
``FxModel.graph_module``.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from torch import nn

from effc.ir.compression import CompressionState
from effc.ir.ort import session_for
from effc.ir.trace import trace


def ulp_nudge(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``a`` with every finite float32 element moved one ulp up or down at random: one fp32
    rounding of every value. Scalars (exponents, epsilons: hyperparameters, not data) and
    mask-like constants of magnitude 1e30 and more stay."""
    if a.dtype != np.float32 or a.size <= 1:
        return a
    away = np.where(rng.random(a.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
    with np.errstate(over="ignore"):
        nudged = np.nextafter(a, away)
    return np.where(np.isfinite(a) & (np.abs(a) < 1e30), nudged, a).astype(np.float32)


@dataclass
class InputSpec:
    name: str
    shape: list  # ints, or strings for symbolic dims
    dtype: str  # numpy dtype name


def _short_target(target) -> str:
    name = getattr(target, "__name__", str(target))
    if hasattr(target, "_schema"):
        name = str(target).replace("aten.", "aten::")
    return name


class FxModel:
    """A torch model with its torch.export trace."""

    kind = "fx"

    def __init__(self, module: nn.Module, example_inputs: dict[str, torch.Tensor]):
        self.module = module
        self.example_inputs = dict(example_inputs)
        self._gm: torch.fx.GraphModule | None = None
        self.graph_modified = False  # a structural pass rewrote graph_module
        # what lossy passes decided (masks, quantization), for later passes and backends
        self.compression = CompressionState()
        self.source = type(module).__name__

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        if self._gm is None:
            with self.plain_outputs():
                self._gm = trace(self.module, self.example_inputs)
        return self._gm

    @graph_module.setter
    def graph_module(self, gm: torch.fx.GraphModule) -> None:
        self._gm = gm
        self.graph_modified = True

    def retrace(self) -> None:
        """Forget the trace; the next use traces ``module`` again (after weight edits)."""
        self._gm = None
        self.graph_modified = False

    def input_specs(self) -> list[InputSpec]:
        return [
            InputSpec(k, list(v.shape), str(v.numpy().dtype))
            for k, v in self.example_inputs.items()
        ]

    @contextlib.contextmanager
    def plain_outputs(self):
        """While effc traces, exports or runs the model: an HF model returns plain tensors, no KV
        cache objects (``config.use_cache`` off); the caller's setting comes back afterwards, so
        the module stays ready for ``generate()``."""
        config = getattr(self.module, "config", None)
        if getattr(config, "use_cache", None) is None:
            yield
            return
        old, config.use_cache = config.use_cache, False
        try:
            yield
        finally:
            config.use_cache = old

    @property
    def runner(self) -> nn.Module:
        """The module that computes the compressed model: the source module (any input shape)
        unless a structural pass (``fuse``, ``remove-blocks`` on a graph) rewrote the graph, then
        the (static-shape) graph module. ``module`` is the user's own object, which such a pass
        leaves behind."""
        return self.graph_module if self.graph_modified else self.module

    @torch.no_grad()
    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs on numpy inputs."""
        with self.plain_outputs():
            outputs = self.runner(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
        flat, _ = torch.utils._pytree.tree_flatten(outputs)
        return [t.detach().numpy() for t in flat if isinstance(t, torch.Tensor)]

    def run_all(self, inputs: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        return [self.run(x) for x in inputs]

    def nonfinite_weights(self) -> list[str]:
        """Names of float parameters and buffers holding NaN or Inf."""
        named = [*self.module.named_parameters(), *self.module.named_buffers()]
        return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]

    @torch.no_grad()
    def run_nudged(self, inputs: list[dict], seed: int) -> list[list[np.ndarray]]:
        """Outputs with every float parameter, buffer and input one ulp off (``ulp_nudge``): the
        model's own sensitivity to fp32 rounding. The weights are restored afterwards."""
        rng = np.random.default_rng(seed)
        tensors = [t for t in [*self.runner.parameters(), *self.runner.buffers()]]
        tensors = [t for t in dict.fromkeys(tensors) if t.dtype == torch.float32]
        saved = [t.detach().clone() for t in tensors]
        try:
            for t in tensors:
                t.copy_(torch.from_numpy(ulp_nudge(t.detach().numpy(), rng)))
            return [
                self.run({k: ulp_nudge(np.asarray(v), rng) for k, v in x.items()}) for x in inputs
            ]
        finally:
            for t, s in zip(tensors, saved):
                t.copy_(s)

    def vocab_hint(self) -> int | None:
        sizes = [m.num_embeddings for m in self.module.modules() if isinstance(m, nn.Embedding)]
        return min(sizes) if sizes else None

    def op_histogram(self) -> dict[str, int]:
        hist = collections.Counter(
            _short_target(n.target)
            for n in self.graph_module.graph.nodes
            if n.op == "call_function"
        )
        return dict(sorted(hist.items()))

    def param_stats(self) -> tuple[int, int]:
        """Parameters and bytes of the tensors the graph uses (get_attr), each counted once."""
        seen: dict[int, torch.Tensor] = {}
        for node in self.graph_module.graph.nodes:
            if node.op == "get_attr":
                t = attr_tensor(self.graph_module, node.target)
                if isinstance(t, torch.Tensor):
                    seen.setdefault(id(t), t)
        params = sum(t.numel() for t in seen.values() if t.is_floating_point())
        return params, sum(t.numel() * t.element_size() for t in seen.values())


def attr_tensor(gm: torch.fx.GraphModule, target: str):
    """The object a get_attr target names (``features.0.0.weight``)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class OnnxModel:
    """An ONNX model held as onnx_ir (weights may be lazy external tensors)."""

    model: ir.Model
    path: Path | None = None
    kind: str = field(default="onnx", init=False)
    compression: CompressionState = field(default_factory=CompressionState)

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "onnx"

    def input_specs(self) -> list[InputSpec]:
        specs = []
        for v in self.model.graph.inputs:
            if v.name in self.model.graph.initializers:
                continue
            shape = [
                d if isinstance(d, int) else (getattr(d, "value", None) or "?")
                for d in (v.shape or [])
            ]
            dtype = v.dtype.numpy().name if v.dtype is not None else "float32"
            specs.append(InputSpec(v.name, shape, dtype))
        return specs

    def output_names(self) -> list[str]:
        return [v.name for v in self.model.graph.outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs under onnxruntime with its exact graph rewrites only (the reference)."""
        return self.run_all([inputs])[0]

    def run_all(self, inputs: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """Outputs on every input set, from one onnxruntime session."""
        session = session_for(self.model, optimize="basic")
        return [session.run(None, x) for x in inputs]

    def run_nudged(self, inputs: list[dict], seed: int) -> list[list[np.ndarray]]:
        """Outputs with every float initializer, Constant and input one ulp off (``ulp_nudge``):
        the model's own sensitivity to fp32 rounding. The weights are restored afterwards."""
        rng = np.random.default_rng(seed)
        graph = self.model.graph
        saved_inits, saved_attrs = {}, []
        try:
            for v in graph.initializers.values():
                t = v.const_value
                if t is not None and t.dtype == ir.DataType.FLOAT and not _sets_shapes(v):
                    saved_inits[v] = t
                    v.const_value = ir.tensor(ulp_nudge(t.numpy(), rng), name=v.name)
            for n in graph.all_nodes():
                attr = n.attributes.get("value") if n.op_type == "Constant" else None
                if (
                    attr is not None
                    and attr.type == ir.AttributeType.TENSOR
                    and not _sets_shapes(n.outputs[0])
                ):
                    t = attr.as_tensor()
                    if t.dtype == ir.DataType.FLOAT:
                        saved_attrs.append((n, attr))
                        n.attributes["value"] = ir.AttrTensor(
                            "value", ir.tensor(ulp_nudge(t.numpy(), rng))
                        )
            session = session_for(self.model, optimize="basic")
        finally:
            for v, t in saved_inits.items():
                v.const_value = t
            for n, attr in saved_attrs:
                n.attributes["value"] = attr
        return [
            session.run(None, {k: ulp_nudge(np.asarray(a), rng) for k, a in x.items()})
            for x in inputs
        ]

    def nonfinite_weights(self) -> list[str]:
        """Names of float initializers holding NaN or Inf (masks of -inf are data, not weights:
        only NaN, +Inf, and Inf of both signs in one tensor count)."""
        bad = []
        for v in self.model.graph.initializers.values():
            t = v.const_value
            if t is None or not t.dtype.is_floating_point():
                continue
            a = t.numpy()
            if np.isnan(a).any() or (np.isposinf(a).any() and np.isneginf(a).any()):
                bad.append(v.name)
        return bad

    def has_activation_qdq(self) -> bool:
        return any(_is_activation_q(n) for n in self.model.graph.all_nodes())

    def without_activation_qdq(self) -> OnnxModel:
        """A copy with every activation QuantizeLinear -> DequantizeLinear pair removed (weight
        DequantizeLinear of constant codes stays): the float semantics a rewrite of a Q/DQ graph
        must keep, without the rounding steps a one-ulp difference can flip."""
        copy = ir.serde.deserialize_model(ir.serde.serialize_model(self.model))
        graph = copy.graph
        for q in [n for n in graph if _is_activation_q(n)]:
            x = q.inputs[0]
            for use in list(q.outputs[0].uses()):
                dq = use.node
                if dq.op_type == "DequantizeLinear" and dq.domain in ("", "ai.onnx"):
                    out = dq.outputs[0]
                    if out.is_graph_output():
                        continue
                    out.replace_all_uses_with(x)
        RemoveUnusedNodesPass()(copy)
        return OnnxModel(copy, self.path)

    def vocab_hint(self) -> int | None:
        inputs = {v.name for v in self.model.graph.inputs}
        sizes = [
            n.inputs[0].shape[0]
            for n in self.model.graph.all_nodes()
            if n.op_type == "Gather"
            and n.inputs[0] is not None
            and n.inputs[0].is_initializer()
            and n.inputs[1] is not None
            and n.inputs[1].name in inputs
        ]
        return min(sizes) if sizes else None

    def op_histogram(self) -> dict[str, int]:
        hist = collections.Counter(
            (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
            for n in self.model.graph.all_nodes()
        )
        return dict(sorted(hist.items()))

    def param_stats(self) -> tuple[int, int]:
        params = nbytes = 0
        tensors = [v.const_value for v in self.model.graph.initializers.values()]
        tensors += [
            n.attributes["value"].as_tensor()
            for n in self.model.graph.all_nodes()
            if n.op_type == "Constant" and "value" in n.attributes
        ]
        for t in tensors:
            if t is None:
                continue
            n = int(np.prod(t.shape.numpy())) if t.shape is not None else 0
            if t.dtype.is_floating_point():
                params += n
            nbytes += t.nbytes
        return params, nbytes


# float inputs that decide output shapes, not values: a one-ulp nudge would change the graph's
# shapes (Resize's roi and scales, Upsample's scales), not its rounding
_SHAPE_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def _sets_shapes(value: ir.Value) -> bool:
    return any((u.node.op_type, u.idx) in _SHAPE_INPUTS for u in value.uses())


def _is_activation_q(node: ir.Node) -> bool:
    """A QuantizeLinear of a computed value (not of a constant weight)."""
    if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
        return False
    x = node.inputs[0]
    return x is not None and not x.is_initializer() and x.const_value is None


Model = FxModel | OnnxModel
