"""The fusion rule table. Every rule here is exact (same math, float rounding aside)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from onnxscript.rewriter import RewriteRuleSet

from effc.passes.fuse.batchnorm import fuse_batchnorm_fx, fuse_batchnorm_onnx
from effc.passes.fuse.matmul_add import matmul_add_onnx


@dataclass(frozen=True)
class Rule:
    doc: str
    onnx: Callable[[], RewriteRuleSet] | None = None
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
}
