"""effc: compiler-style graph transformations that make neural networks smaller and faster.

import effc
result = effc.Pipeline.from_text("cleanup,fuse").run("model.onnx")
result.report.print()
"""

from __future__ import annotations

__version__ = "0.1.0"

from effc.context import PassContext  # noqa: E402
from effc.errors import EffcError  # noqa: E402
from effc.pass_base import Pass, PassResult, register, registry  # noqa: E402
from effc.pipeline import DumpInstrument, Pipeline, PipelineResult, VerifyInstrument  # noqa: E402
from effc.report import Report  # noqa: E402


def load(ref: str, shapes: dict | None = None, task: str | None = None):
    """Load a model reference (``.onnx`` path, HF folder, ``builtin:NAME``, ``py:mod:fn``)."""
    from effc.ir.torch_io import load_model

    return load_model(ref, shapes, task)


__all__ = [
    "DumpInstrument",
    "EffcError",
    "Pass",
    "PassContext",
    "PassResult",
    "Pipeline",
    "PipelineResult",
    "Report",
    "VerifyInstrument",
    "load",
    "register",
    "registry",
]
