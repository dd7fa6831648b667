"""effc: compiler-style graph transformations that make neural networks smaller and faster.

import effc
result = effc.Pipeline.from_text("cleanup,fuse").run("model.onnx")
result.report.print()

Names are exported lazily (PEP 562): importing ``effc`` or a lower layer (``effc.ir``) does not
import the pipeline, the passes or torch until one of them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it (and the name there, where it differs)
_EXPORTS = {
    "PassContext": "effc.context",
    "EffcError": "effc.errors",
    "Pass": "effc.pass_base",
    "PassResult": "effc.pass_base",
    "register": "effc.registry",
    "registry": "effc.pipeline",
    "DumpInstrument": "effc.instruments",
    "VerifyInstrument": "effc.instruments",
    "Pipeline": "effc.pipeline",
    "PipelineResult": "effc.pipeline",
    "Report": "effc.report",
    "load": ("effc.ir.torch_io", "load_model"),
    "compile_model": "effc.compile",
}

if TYPE_CHECKING:
    from effc.compile import compile_model
    from effc.context import PassContext
    from effc.errors import EffcError
    from effc.instruments import DumpInstrument, VerifyInstrument
    from effc.ir.torch_io import load_model as load
    from effc.pass_base import Pass, PassResult
    from effc.pipeline import Pipeline, PipelineResult, registry
    from effc.registry import register
    from effc.report import Report


def __getattr__(name: str):
    if name in _EXPORTS:
        where = _EXPORTS[name]
        module, attr = where if isinstance(where, tuple) else (where, name)
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'effc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
    "compile_model",
    "load",
    "register",
    "registry",
]
