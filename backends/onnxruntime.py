"""The reference backend: the model as plain ONNX, executed by onnxruntime on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from effc.errors import InputError
from effc.ir.onnx_io import save_onnx

NAME = "onnxruntime"
MODEL_FILE = "model.onnx"


_LEVELS = {
    True: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    False: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    # semantics-preserving rewrites only: the extended level fuses e.g. DequantizeLinear(int4) +
    # MatMul into MatMulNBits, whose arithmetic differs from the graph's by up to ~1e-1
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
}


def session_options(threads: int | None = None, optimize: bool | str = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or int(os.environ.get("EFFC_THREADS", "2"))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = _LEVELS[optimize]
    return opts


def session_for(
    model: ir.Model, threads: int | None = None, optimize: bool | str = True
) -> ort.InferenceSession:
    """An onnxruntime session for an in-memory model (weights are serialized, not copied twice);
    ``optimize``: True (all of onnxruntime's graph optimizations), ``"basic"`` (exact rewrites
    only: the reference semantics) or False (none)."""

    proto = ir.serde.serialize_model(model)
    opts = session_options(threads, optimize)

    from effc.passes.bsr_pack import DOMAIN

    if DOMAIN in model.opset_imports:  # BSR kernel nodes: register effc's custom op
        from effc.backends.bsr import _register_op

        opts.register_custom_ops_library(_register_op())
    try:
        return ort.InferenceSession(
            proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )

    except Exception as e:
        raise InputError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from e


def legalization() -> list[str]:
    return []


def lower(model: ir.Model, out_dir: Path) -> list[Path]:
    """Write the artifact's model files into ``out_dir``; return them."""
    return save_onnx(model, out_dir / MODEL_FILE)


def run(
    out_dir: Path,
    inputs: dict[str, np.ndarray],
    threads: int | None = None,
    optimize: bool | str = True,
) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(
        str(out_dir / MODEL_FILE),
        session_options(threads, optimize),
        providers=["CPUExecutionProvider"],
    )

    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, inputs)))
