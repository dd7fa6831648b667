"""The fusion rule table. Every rule here is exact (same math, float rounding aside)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.common import expand_before_binary_op_rules

from effc.passes.fuse._onnx import GraphRule
from effc.passes.fuse.affine import affine_onnx, linear_chain_onnx, split_conv_onnx
from effc.passes.fuse.affine_fx import affine_fx, linear_chain_fx
from effc.passes.fuse.batchnorm import fuse_batchnorm_fx, fuse_batchnorm_onnx
from effc.passes.fuse.channel_linear import channel_linear_onnx
from effc.passes.fuse.layout import hoist_onnx, layout_fx, layout_onnx
from effc.passes.fuse.matmul_add import matmul_add_onnx


@dataclass(frozen=True)
class Rule:
    doc: str
    onnx: Callable[[], RewriteRuleSet | GraphRule] | None = None
    fx: Callable | None = None


RULES: dict[str, Rule] = {
    "batchnorm": Rule(
        "Conv/ConvTranspose/Gemm followed by inference BatchNorm -> one op with folded weights",
        onnx=fuse_batchnorm_onnx,
        fx=fuse_batchnorm_fx,
    ),
    "matmul-add": Rule(
        "2-D MatMul + Add of a bias broadcastable to (M, N) -> Gemm",
        onnx=matmul_add_onnx,
    ),
    "layout-chains": Rule(
        "chains of Reshape/Transpose/Squeeze/... -> nothing, one Reshape or one Transpose "
        "(inverse pairs cancel; per-layer patch partition/reverse becomes unfold once)",
        onnx=layout_onnx,
        fx=layout_fx,
    ),
    "unfold-once": Rule(
        "Add(R(a), R(b)) -> R(a + b) and Add(x, R(b)) -> R(P(x) + b) for a patch reverse R whose "
        "partition P = R^-1 of x exists: residual adds move into patch space, so a stack that "
        "partitions and reverses around every op keeps one unfold and one fold",
        onnx=hoist_onnx,
    ),
    "expand-binary": Rule(
        "Expand feeding a broadcasting binary op (Add/Mul/Div/...) whose own broadcast gives the "
        "same result -> dropped (e.g. the expand_as of F.normalize)",
        onnx=lambda: expand_before_binary_op_rules,
    ),
    "channel-linear": Rule(
        "Transpose(B,C,L -> B,L,C) -> MatMul (+ bias) [-> Split of the last axis] -> Transpose "
        "back -> one 1x1 Conv [-> Split of channels]: a Linear over the channels of a "
        "transposed tensor (conv-attention qkv) is a 1x1 conv, and the transposes cancel",
        onnx=channel_linear_onnx,
    ),
    "split-conv": Rule(
        "Split along channels of a Conv output -> one Conv per part (a depthwise conv takes the "
        "Split to its input first), so no split copy is made",
        onnx=split_conv_onnx,
    ),
    "affine": Rule(
        "constant per-channel Mul/Add before or after Conv/MatMul/Gemm -> folded into its "
        "weights and bias; consecutive constant Mul/Add merged",
        onnx=affine_onnx,
        fx=affine_fx,
    ),
    "linear-chain": Rule(
        "1x1 conv -> 1x1 conv, MatMul -> MatMul (constant weights, nothing between) -> one op, "
        "where that does not add FLOPs",
        onnx=linear_chain_onnx,
        fx=linear_chain_fx,
    ),
}

# rules that only move data or regroup the same elementwise operations: outputs bit-identical
BITWISE_RULES = frozenset({"layout-chains", "unfold-once", "expand-binary"})
