"""quantize-activations: W8A8 with explicit Q/DQ for int8 engines (TensorRT's int8 path).

Every Conv / MatMul / Gemm with a constant weight gets
- its activation input through QuantizeLinear -> DequantizeLinear, symmetric int8 (zero point
  0, as TensorRT requires), one pair per activation value however many ops read it; the scale is
  amax / 127 with amax from the calibration data by ``method``:
  ``minmax`` (largest |x| seen), ``percentile`` (that percentile of |x|), ``entropy`` (TensorRT's
  KL-divergence threshold on a 2048-bin histogram of |x|);
- its weight stored as int8 per output channel (symmetric) behind a DequantizeLinear.
Lossy: the report gives the measured output error; the result runs under onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from effc.errors import InputError
from effc.ir.calibrate import collect_values
from effc.pass_base import Pass, PassResult
from effc.passes.fuse._onnx import const, initializer, insert, like
from effc.registry import register

BINS = 2048


def kl_threshold(hist: np.ndarray, edges: np.ndarray, levels: int = 128, stride: int = 8) -> float:
    """TensorRT's entropy calibration: the clipping threshold whose ``levels``-bin quantized
    distribution is closest (KL divergence) to the clipped reference distribution."""
    hist = hist.astype(np.float64)
    best, best_kl = len(hist), np.inf
    for i in range(levels, len(hist) + 1, stride):
        ref = hist[:i].copy()
        ref[-1] += hist[i:].sum()
        q = np.zeros(i)
        for chunk in np.array_split(np.arange(i), levels):
            nz = hist[chunk] != 0
            if nz.any():
                q[chunk[nz]] = hist[chunk].sum() / nz.sum()
        p_sum, q_sum = ref.sum(), q.sum()
        if p_sum == 0 or q_sum == 0:
            continue
        p, qn = ref / p_sum, q / q_sum
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    return float(edges[best - 1])  # upper edge of the last kept bin


class _Range:
    def __init__(self):
        self.amax = 0.0
        self.hist = None

    def observe_max(self, x: np.ndarray) -> None:
        self.amax = max(self.amax, float(np.abs(x).max(initial=0.0)))

    def observe_hist(self, x: np.ndarray) -> None:
        h, _ = np.histogram(np.abs(x), bins=BINS, range=(0.0, self.amax or 1.0))
        self.hist = h if self.hist is None else self.hist + h

    def threshold(self, method: str, percentile: float) -> float:
        if method == "minmax" or self.hist is None:
            return self.amax
        edges = np.linspace(0.0, self.amax or 1.0, BINS + 1)[1:]
        if method == "percentile":
            cdf = np.cumsum(self.hist) / max(self.hist.sum(), 1)
            return float(edges[min(int(np.searchsorted(cdf, percentile / 100.0)), BINS - 1)])
        return kl_threshold(self.hist, edges)


def _weight_axis(node: ir.Node) -> int:
    """Axis of the weight tensor that indexes output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        t = node.attributes.get("transB")
        return 0 if t is not None and t.value else 1
    return 1  # MatMul (K, N)


def _sites(graph: ir.Graph, ops: list[str]) -> list[ir.Node]:
    out = []
    for node in graph:
        if node.op_type not in ops or node.domain != "" or len(node.inputs) < 2:
            continue
        w = const(node.inputs[1])
        x = node.inputs[0]
        if w is None or w.dtype != np.float32 or x is None or x.dtype != ir.DataType.FLOAT:
            continue
        if node.op_type == "MatMul" and w.ndim != 2:
            continue
        out.append(node)
    return out


@register
class QuantizeActivations(Pass):
    """int8 activations (calibrated) + int8 per-channel weights as explicit Q/DQ (W8A8)."""

    name = "quantize-activations"
    kinds = ("onnx",)
    lossy = True

    @dataclass
    class Options:
        method: Literal["minmax", "percentile", "entropy"] = "entropy"
        percentile: float = 99.99
        ops: list[str] = field(default_factory=lambda: ["Conv", "MatMul", "Gemm"])

    def needs_calibration(self) -> bool:
        return True

    def run(self, model, ctx) -> PassResult:
        if not ctx.calibration:
            raise InputError("quantize-activations needs calibration inputs (--calib)")
        graph = model.model.graph
        sites = _sites(graph, self.options.ops)
        if not sites:
            return PassResult(model, False, {"sites": 0})
        acts = list(dict.fromkeys(n.inputs[0] for n in sites))
        ranges = {v.name: _Range() for v in acts}

        def observe(fn):
            def each(outs):
                for name, r in ranges.items():
                    fn(r, outs[name])

            collect_values(model, acts, ctx.calibration, each)

        observe(_Range.observe_max)
        if self.options.method != "minmax":
            observe(_Range.observe_hist)
        if model.model.opset_imports.get("", 1) < 13:
            raise InputError("quantize-activations needs opset 13+ (per-channel DequantizeLinear)")
        scales = {}
        for value in acts:
            amax = ranges[value.name].threshold(self.options.method, self.options.percentile)
            scales[value.name] = max(amax, 1e-8) / 127.0
            self._qdq_activation(graph, value, scales[value.name])
        for node in sites:
            self._qdq_weight(graph, node)
        stats = {
            "sites": len(sites),
            "activations": len(acts),
            "method": self.options.method,
            "scales": {k: float(f"{v:.4g}") for k, v in scales.items()},
        }
        return PassResult(model, True, stats)

    @staticmethod
    def _qdq_activation(graph: ir.Graph, value: ir.Value, scale: float) -> None:
        consumers = [u.node for u in value.uses() if u.node.op_type in ("Conv", "MatMul", "Gemm")]
        first = consumers[0]
        s = initializer(graph, f"{value.name}_scale", np.array(scale, dtype=np.float32))
        z = initializer(graph, f"{value.name}_zero_point", np.array(0, dtype=np.int8))
        q = insert(graph, first, ir.node("QuantizeLinear", [value, s, z]))
        dq = insert(graph, first, ir.node("DequantizeLinear", [q, s, z]))
        q.shape, q.dtype = value.shape, ir.DataType.INT8
        like(dq, value)
        for node in consumers:
            for i, inp in enumerate(node.inputs):
                if inp is value and i == 0:
                    node.replace_input_with(i, dq)

    @staticmethod
    def _qdq_weight(graph: ir.Graph, node: ir.Node) -> None:
        w = const(node.inputs[1])
        axis = _weight_axis(node)
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=reduce)
        scale = (np.maximum(amax, 1e-12) / 127.0).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        base = node.inputs[1].name or f"{node.name}_w"
        qv = initializer(graph, f"{base}_int8", q)
        sv = initializer(graph, f"{base}_scale", scale)
        zv = initializer(graph, f"{base}_zero_point", np.zeros_like(scale, dtype=np.int8))
        dq = insert(graph, node, ir.node("DequantizeLinear", [qv, sv, zv], {"axis": axis}))
        dq.shape, dq.dtype = ir.Shape(w.shape), ir.DataType.FLOAT
        node.replace_input_with(1, dq)
