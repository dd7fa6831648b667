"""The BSR backend: compressed linear layers run by effc's BSR kernels (DESIGN.md section 5).

Decision (the "two ways" of DESIGN.md): the artifact is one ONNX graph in which every compressed
MatMul becomes ``ai.onnx.contrib::BSRMatMul(x, indptr, indices, values, scales, zeros)`` (or
``BSRMatMulA8``, the opt-in int8-activation mode) with the packed BSR arrays as initializers
(fp16 scales as their uint16 bits); ``effc run`` executes it with onnxruntime, where that op is an
onnxruntime-extensions Python custom op that calls the compiled kernel on the packed bytes
(``effc.runtime.ort_op``). Everything else runs in onnxruntime as usual. The rewrite is the
``bsr-pack`` pass, which this target appends to the pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from effc.backends.onnxruntime import run_file
from effc.ir.onnx_io import save_onnx
from effc.runtime.ort_op import DOMAIN

NAME = "bsr"
MODEL_FILE = "model.onnx"


def legalization() -> list[str]:
    """Passes this target appends to the pipeline (shown in the report)."""
    return ["bsr-pack"]


def lower(model: ir.Model, out_dir: Path) -> list[Path]:
    return save_onnx(model, out_dir / MODEL_FILE)


def run(
    out_dir: Path, inputs: dict[str, np.ndarray], threads: int | None = None
) -> dict[str, np.ndarray]:
    return run_file(out_dir / MODEL_FILE, inputs, threads, domains=[DOMAIN])
