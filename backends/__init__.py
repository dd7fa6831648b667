"""Lowering targets. Each backend module exposes ``NAME``, ``legalization()`` (pass texts it
appends to the pipeline), ``lower(model, out_dir)`` and ``run(out_dir, inputs)``."""

from __future__ import annotations

from types import ModuleType

from effc.errors import UnsupportedError, did_you_mean


def get_backend(name: str) -> ModuleType:
    from effc.backends import bsr, onnxruntime, tensorrt

    backends = {onnxruntime.NAME: onnxruntime, bsr.NAME: bsr, tensorrt.NAME: tensorrt}

    if name not in backends:
        raise UnsupportedError(
            f"unknown target {name!r}{did_you_mean(name, backends)}; available: {', '.join(backends)}"
        )
    return backends[name]
