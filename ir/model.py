"""The two IR kinds a pass sees: ``FxModel`` (torch.fx via torch.export) and ``OnnxModel``.

Both expose the same small surface the pipeline, report and checker need: ``kind``, input
specs, ``run(inputs)`` on numpy arrays, op histogram, parameter count and bytes. Weight-level
passes edit ``FxModel.module`` (the user's nn.Module) in place; structural FX passes edit
``FxModel.graph_module``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from effc.ir.compression import CompressionState
from effc.ir.ort import session_for
from effc.ir.trace import trace


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

    @torch.no_grad()
    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs on numpy inputs: the source module (any input shape) unless a structural
        pass rewrote the graph, then the (static-shape) graph module."""
        runner = self.graph_module if self.graph_modified else self.module
        outputs = runner(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
        flat, _ = torch.utils._pytree.tree_flatten(outputs)
        return [t.detach().numpy() for t in flat if isinstance(t, torch.Tensor)]

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
                d if isinstance(d, int) else (str(d) if d is not None else "?")
                for d in (v.shape or [])
            ]
            dtype = v.dtype.numpy().name if v.dtype is not None else "float32"
            specs.append(InputSpec(v.name, shape, dtype))
        return specs

    def output_names(self) -> list[str]:
        return [v.name for v in self.model.graph.outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs under onnxruntime with its exact graph rewrites only (the reference)."""
        return session_for(self.model, optimize="basic").run(None, inputs)

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


Model = FxModel | OnnxModel
