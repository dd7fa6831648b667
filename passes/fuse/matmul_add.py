"""Rule ``matmul-add``: Add(MatMul(A, B), C) -> Gemm(A, B, C) where that is legal.

Gemm computes A @ B + C for 2-D A (M x K) and B (K x N), with C unidirectionally broadcastable
to (M, N). onnxscript's rule checks the ranks of A and B; this one also requires C's shape to be
known, of rank <= 2 and to broadcast to exactly (M, N), so the output shape cannot change, and
a floating-point type. Either operand order of the Add matches.
"""

from __future__ import annotations

from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.common._matmul_add_to_gemm import MatMulAddToGemm

_FLOAT_TYPES = {"FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16"}


class LegalMatMulAddToGemm(MatMulAddToGemm):
    def check(self, context, input_a, input_b, input_c=None, **_):
        result = super().check(context, input_a, input_b)
        if not result:
            return result
        a, b = input_a.shape, input_b.shape
        c = input_c.shape if input_c is not None else None
        if c is None or input_a.dtype is None or input_a.dtype.name not in _FLOAT_TYPES:
            return result.fail("bias shape unknown or type not floating point")
        m, n = a[0], b[1]
        if len(c) > 2:
            return result.fail("bias rank > 2 would change the output rank")
        dims = [1] * (2 - len(c)) + list(c)
        if dims[0] not in (1, m) or dims[1] not in (1, n):
            return result.fail(f"bias shape {list(c)} does not broadcast to ({m}, {n})")
        return result


def matmul_add_onnx() -> RewriteRuleSet:
    return RewriteRuleSet([LegalMatMulAddToGemm().rule()], commute=True)
