"""Lowering targets. Each backend module exposes ``NAME``, ``legalization()`` (pass texts it
appends to the pipeline), ``lower(model, out_dir)`` and ``run(out_dir, inputs)``."""

from __future__ import annotations

from types import ModuleType

from effc.backends import bsr, onnxruntime, tensorrt, tvm
from effc.errors import UnsupportedError, did_you_mean

BACKENDS: dict[str, ModuleType] = {m.NAME: m for m in (onnxruntime, bsr, tensorrt, tvm)}


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise UnsupportedError(
            f"unknown target {name!r}{did_you_mean(name, BACKENDS)}; available: {', '.join(BACKENDS)}"
        )
    return BACKENDS[name]
