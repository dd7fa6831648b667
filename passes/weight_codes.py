"""weight-codes: quantized weights stored as codes for onnxruntime (the ``onnxruntime`` target
appends it). A quantized MatMul weight becomes ``com.microsoft::MatMulNBits`` (int4/int8, group a
power of two >= 16: onnxruntime's weight-only kernel, ``accuracy_level`` its compute mode);
every other quantized weight (int2/int3, other groups, Gemm) becomes codes behind a
``DequantizeLinear(block_size)`` (opset 21). Pruned groups are codes at their zero point. The
artifact then holds about bits/32 of the fp32 weight bytes; the graph computes the fake-quantized
model (``accuracy_level`` 0 or 1: fp32 compute, checked like a lossless pass; 4 quantizes the
activations to int8 per block: lossy, its error measured)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onnx_ir.passes.common import RemoveUnusedNodesPass

from effc.ir.sites import weight_sites
from effc.pass_base import Pass, PassResult
from effc.passes._codes import (
    MS_DOMAIN,
    block_dequantize,
    gather_block_quantized,
    gathers_of,
    matmul_nbits,
    matmul_nbits_applies,
    quantized_tables,
)
from effc.passes.layernorm_onnx import raise_opset
from effc.registry import register


@register
class WeightCodes(Pass):
    """Quantized weights as codes: MatMulNBits for MatMul, DequantizeLinear blocks elsewhere."""

    name = "weight-codes"
    kinds = ("onnx",)

    @dataclass
    class Options:
        format: Literal["auto", "dequantize"] = "auto"  # auto: MatMulNBits where it applies
        accuracy_level: Literal[0, 1, 4] = 0

    def validate(self) -> None:
        self.lossy = self.options.accuracy_level == 4

    def run(self, model, ctx) -> PassResult:
        graph = model.model.graph
        nbits = dequantized = 0
        sites = [
            (s, model.compression.sites[s.fqn])
            for s in weight_sites(model)
            if model.compression.is_quantized(s.fqn)
        ]
        weights = [s for s, _ in sites]
        tables = quantized_tables(model, weights)  # before the MatMuls' weights are replaced
        shared: dict[str, tuple] = {}  # linear site fqn -> its MatMulNBits initializers
        for site, state in sites:
            if self.options.format == "auto" and matmul_nbits_applies(site, state):
                shared[site.fqn] = matmul_nbits(graph, site, state, self.options.accuracy_level)
                nbits += 1
            else:
                raise_opset(model.model, 21)
                block_dequantize(graph, site, state)
                dequantized += 1
        gathers, tied = 0, []
        for table, state, via in tables if self.options.format == "auto" else []:
            arrays = shared.get(via)
            if arrays is not None:
                tied.append(via)
            for gather in gathers_of(table):
                gather_block_quantized(graph, gather, state, arrays)
                gathers += 1
        if nbits or gathers:
            model.model.opset_imports.setdefault(MS_DOMAIN, 1)
        if sites or gathers:
            RemoveUnusedNodesPass()(model.model)
        stats = {"matmul_nbits": nbits, "dequantize_linear": dequantized}
        if gathers:
            stats["gather_block_quantized"] = gathers
            stats["tied_to"] = tied
        return PassResult(model, bool(sites or gathers), stats)
