"""The BSR backend: compressed linear layers run by effc's BSR kernels (DESIGN.md section 5).

Decision (the "two ways" of DESIGN.md): the artifact is one ONNX graph in which every compressed
MatMul becomes ``ai.onnx.contrib::BSRMatMul(x, indptr, indices, values, scales, zeros)`` (or
``BSRMatMulA8``, the opt-in int8-activation mode) with
the packed BSR arrays as initializers (fp16 scales as their uint16 bits); ``effc run`` executes it with onnxruntime, where that op is
an onnxruntime-extensions Python custom op that calls the compiled kernel on the packed bytes.
Everything else runs in onnxruntime as usual. The rewrite is the ``bsr-pack`` pass, which this
target appends to the pipeline.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from effc.errors import UnsupportedError
from effc.ir.onnx_io import save_onnx
from effc.passes.bsr_pack import OP, OP_A8

NAME = "bsr"
MODEL_FILE = "model.onnx"


@functools.cache
def _register_op() -> str:
    """Register the Python custom op once per process; return the extensions library path."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError as e:
        raise UnsupportedError(
            "the bsr target needs onnxruntime-extensions: pip install onnxruntime-extensions"
        ) from e
    from effc.runtime.modules import bsr_matmul as kernel
    from effc.runtime.modules import check_activations

    t = PyCustomOpDef

    def define(op_type: str, a8: bool) -> None:
        @onnx_op(
            op_type=op_type,
            inputs=[t.dt_float, t.dt_int32, t.dt_uint16, t.dt_uint8, t.dt_uint16, t.dt_uint8],
            outputs=[t.dt_float],
            attrs={"out_features": t.dt_int64, "group": t.dt_int64, "bits": t.dt_int64},
        )
        def bsr_matmul(x, indptr, indices, values, scales, zeros, **attrs):
            n, g, bits = int(attrs["out_features"]), int(attrs["group"]), int(attrs["bits"])
            x2 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            x2 = x2.reshape(-1, x.shape[-1])
            half_scales = torch.from_numpy(scales).view(torch.float16)  # stored as uint16 bits
            arrays = [torch.from_numpy(a) for a in (indptr, indices, values)]
            arrays += [half_scales, torch.from_numpy(zeros)]
            y = kernel(x2, arrays, n, g, bits, a8 and check_activations("int8", bits))
            return y.numpy().reshape(*x.shape[:-1], n)

    define(OP, False)
    define(OP_A8, True)

    return get_library_path()


def session(model_path_or_bytes, threads: int | None = None):
    import onnxruntime as ort

    from effc.backends.onnxruntime import session_options

    opts = session_options(threads)
    opts.register_custom_ops_library(_register_op())
    return ort.InferenceSession(model_path_or_bytes, opts, providers=["CPUExecutionProvider"])


def legalization() -> list[str]:
    """Passes this target appends to the pipeline (shown in the report)."""
    return ["bsr-pack"]


def lower(model: ir.Model, out_dir: Path) -> list[Path]:
    return save_onnx(model, out_dir / MODEL_FILE)


def run(
    out_dir: Path, inputs: dict[str, np.ndarray], threads: int | None = None
) -> dict[str, np.ndarray]:
    sess = session(str(out_dir / MODEL_FILE), threads)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, inputs)))
