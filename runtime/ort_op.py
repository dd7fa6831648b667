"""The BSR kernels as an onnxruntime custom op: ``ai.onnx.contrib::BSRMatMul(x, indptr, indices,
values, scales, zeros)`` (and ``BSRMatMulA8``, the opt-in int8-activation mode), attributes
``out_features``, ``group`` and ``bits``; fp16 scales travel as their uint16 bits.

The op is an onnxruntime-extensions Python custom op that calls the compiled kernel on the packed
bytes. Importing this module registers its domain with ``effc.ir.ort``, so every session of a
model that uses it loads the op."""

from __future__ import annotations

import functools

import numpy as np
import torch

from effc.errors import UnsupportedError
from effc.ir.ort import register_domain
from effc.runtime.modules import bsr_matmul, check_activations

DOMAIN = "ai.onnx.contrib"
OP = "BSRMatMul"
OP_A8 = "BSRMatMulA8"  # the same op with int8 activations (opt-in, lossy)


@functools.cache
def library() -> str:
    """Define the Python custom ops once per process; return the extensions library path."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError as e:
        raise UnsupportedError(
            "the bsr target needs onnxruntime-extensions: pip install onnxruntime-extensions"
        ) from e

    t = PyCustomOpDef

    def define(op_type: str, a8: bool) -> None:
        @onnx_op(
            op_type=op_type,
            inputs=[t.dt_float, t.dt_int32, t.dt_uint16, t.dt_uint8, t.dt_uint16, t.dt_uint8],
            outputs=[t.dt_float],
            attrs={"out_features": t.dt_int64, "group": t.dt_int64, "bits": t.dt_int64},
        )
        def bsr_op(x, indptr, indices, values, scales, zeros, **attrs):
            n, g, bits = int(attrs["out_features"]), int(attrs["group"]), int(attrs["bits"])
            x2 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            x2 = x2.reshape(-1, x.shape[-1])
            half_scales = torch.from_numpy(scales).view(torch.float16)  # stored as uint16 bits
            arrays = [torch.from_numpy(a) for a in (indptr, indices, values)]
            arrays += [half_scales, torch.from_numpy(zeros)]
            y = bsr_matmul(x2, arrays, n, g, bits, a8 and check_activations("int8", bits))
            return y.numpy().reshape(*x.shape[:-1], n)

    define(OP, False)
    define(OP_A8, True)
    return get_library_path()


register_domain(DOMAIN, library)
