"""Shared fixtures: small models built in code, exported once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("EFFC_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_llama():
    from effc.models import BUILTINS

    return BUILTINS["tiny-llama"][0]()


@pytest.fixture(scope="session")
def tiny_cnn():
    from effc.models import BUILTINS

    return BUILTINS["tiny-cnn"][0]()


@pytest.fixture(scope="session")
def llama_onnx(tmp_path_factory, tiny_llama):
    """{"dynamo": path, "legacy": path} of the tiny LLaMA exported both ways."""
    from effc.ir.onnx_io import save_onnx
    from effc.ir.torch_io import export_onnx

    folder = tmp_path_factory.mktemp("llama")
    paths = {}
    for kind in ("dynamo", "legacy"):
        model = export_onnx(tiny_llama, tiny_llama.example_inputs(), legacy=kind == "legacy")
        paths[kind] = folder / f"{kind}.onnx"
        save_onnx(model, paths[kind])
    return paths


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from effc.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
