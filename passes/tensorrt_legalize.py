"""tensorrt-legalize: the last pass before TensorRT (the ``tensorrt`` target appends it).

- opset raised to 18 (LayerNormalization, ReduceMean with axes as an input), or to 21 when
  weight-only int4/int8 groups are written as DequantizeLinear with ``block_size``;
- weights that ``quantize`` compressed (their compression state: codes, scale, zero) stored as codes
  (UINT4 / UINT8) with per-block scale and zero point, so TensorRT reads 4-bit weights rather
  than the fake-quantized fp32 ones; pruned groups are zero codes at their zero point;
- static shapes: the ``--shape`` values fix symbolic input dims, and the report lists any that
  remain (TensorRT then needs an optimization profile);
- every op outside the pinned TensorRT 10 ONNX op table (``TRT_OPS``) is listed as a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from effc.ir.sites import weight_sites
from effc.pass_base import Pass, PassResult
from effc.passes._codes import block_dequantize
from effc.passes.layernorm_onnx import ensure_opset, raise_opset
from effc.registry import register

# onnx-tensorrt's operator support list for TensorRT 10.x (docs/operators.md), default domain
TRT_OPS = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Bernoulli BitShift BlackmanWindow Cast CastLike Ceil Celu Clip Compress Concat Constant
    ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear
    Div Dropout DynamicQuantizeLinear Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
    GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
    Hardmax Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul MatMulInteger Max
    MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Multinomial Neg NonMaxSuppression
    NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
    RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu SequenceAt SequenceConstruct SequenceEmpty SequenceErase
    SequenceInsert SequenceLength Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split SplitToSequence Sqrt Squeeze STFT Sub Sum Tan Tanh
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor""".split()
)


def _fix_shapes(model: ir.Model, shapes: dict[str, list[int]]) -> list[str]:
    """Apply ``--shape`` dims to symbolic input dims; return the dims still symbolic."""
    remaining = []
    for value in model.graph.inputs:
        if value.shape is None:
            remaining.append(f"{value.name}: unknown rank")
            continue
        given = shapes.get(value.name)
        dims = list(value.shape)
        if given is not None and len(given) == len(dims):
            dims = [g if not isinstance(d, int) else d for d, g in zip(dims, given)]
            value.shape = ir.Shape(dims)
        remaining += [
            f"{value.name}[{i}]={d}" for i, d in enumerate(dims) if not isinstance(d, int)
        ]
    return remaining


@register
class TensorRTLegalize(Pass):
    """TensorRT-ready ONNX: opset, int4/int8 block-quantized weights, static shapes, op check."""

    name = "tensorrt-legalize"
    kinds = ("onnx",)

    @dataclass
    class Options:
        weights: bool = True  # write quantized weights as codes + DequantizeLinear(block_size)

    def run(self, model, ctx) -> PassResult:
        m = model.model
        stats: dict = {}
        changed = ensure_opset(m)
        quantized = {
            s.fqn: s
            for s in weight_sites(model)
            if s.op == "linear" and model.compression.is_quantized(s.fqn, (4, 8))
        }
        if self.options.weights and quantized:
            raise_opset(m, 21)
            for fqn, site in quantized.items():
                block_dequantize(m.graph, site, model.compression.sites[fqn])
            stats["block_quantized_weights"] = len(quantized)
            changed = True
        stats["opset"] = m.opset_imports.get("", 1)
        remaining = _fix_shapes(m, {k: list(v) for k, v in (ctx.shapes or {}).items()})
        stats["dynamic_dims"] = remaining
        ops = sorted({n.op_type for n in m.graph if n.domain != "" or n.op_type not in TRT_OPS})
        stats["warnings"] = [f"op {op} is not in the TensorRT 10 op table" for op in ops]
        if changed:
            RemoveUnusedNodesPass()(m)
        return PassResult(model, changed, stats)
