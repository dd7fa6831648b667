"""The reference backend: the model as plain ONNX, executed by onnxruntime on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from effc.ir.onnx_io import save_onnx
from effc.ir.ort import open_session, session_options

NAME = "onnxruntime"
MODEL_FILE = "model.onnx"


def legalization() -> list[str]:
    """Quantized weights stored as codes (MatMulNBits, DequantizeLinear), not as fp32."""
    return ["weight-codes"]


def lower(model: ir.Model, out_dir: Path) -> list[Path]:
    """Write the artifact's model files into ``out_dir``; return them."""
    return save_onnx(model, out_dir / MODEL_FILE)


def run_file(
    path: Path,
    inputs: dict[str, np.ndarray],
    threads: int | None = None,
    optimize: bool | str = True,
    domains=(),
) -> dict[str, np.ndarray]:
    """Run an ONNX file (its external data beside it) on onnxruntime; outputs by name."""
    sess = open_session(str(path), session_options(threads, optimize), domains)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, inputs)))


def run(
    out_dir: Path,
    inputs: dict[str, np.ndarray],
    threads: int | None = None,
    optimize: bool | str = True,
) -> dict[str, np.ndarray]:
    return run_file(out_dir / MODEL_FILE, inputs, threads, optimize)
