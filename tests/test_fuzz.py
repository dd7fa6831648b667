"""Bounded fuzzing of everything that reads user input: the only outcomes allowed are success
or a one-line user error (EffcError, exit 2), never another exception, a hang or partial output.
What may crash natively (the onnx checker, onnxruntime) runs in a subprocess with a timeout."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import effc
from effc.artifact import read_manifest
from effc.calibration import from_npz
from effc.errors import EffcError
from effc.inputs import parse_shapes
from effc.ir.compression import CompressionState, SiteState
from effc.runtime import format as bsr_format

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
PIPELINE_CHARS = st.sampled_from(list('abcdefgz-_{}[](),="\\ 0123456789.e+') + ["fuse", "group"])


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """Flip, drop, duplicate or truncate a few bytes."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        kind, i = int(rng.integers(4)), int(rng.integers(len(b)))
        if kind == 0:
            b[i] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            del b[i : i + int(rng.integers(1, 16))]
        elif kind == 2:
            b[i:i] = b[i : i + int(rng.integers(1, 16))]
        else:
            b = b[:i]
        if not b:
            break
    return bytes(b)


@FUZZ
@given(st.lists(PIPELINE_CHARS, max_size=40).map("".join))
def test_pipeline_text_parses_or_names_the_problem(text):
    try:
        effc.Pipeline.from_text(text)
    except EffcError as e:
        assert "\n" not in str(e)


@FUZZ
@given(st.lists(st.sampled_from(list("ax=0123456789?-_ ")), max_size=20).map("".join))
def test_shape_text_parses_or_names_the_problem(text):
    try:
        shapes = parse_shapes([text])
    except EffcError as e:
        assert "--shape" in str(e)
    else:
        assert all(d == -1 or d > 0 for dims in shapes.values() for d in dims)


def _model_file(tmp_path_factory):
    from effc.ir.onnx_io import save_onnx
    from effc.ir.torch_io import export_onnx
    from effc.models import BUILTINS

    folder = tmp_path_factory.mktemp("fuzz-model")
    model = BUILTINS["tiny-cnn"][0]()
    save_onnx(export_onnx(model, model.example_inputs(), legacy=True), folder / "m.onnx")
    return folder / "m.onnx"


def test_onnx_loader_on_mutated_real_models(tmp_path_factory, tmp_path):
    """200 mutations of a real export, each loaded and inspected by the CLI in a subprocess (the
    onnx checker and onnxruntime are native code): exit 0 or 2, never a traceback or a crash."""
    source = _model_file(tmp_path_factory).read_bytes()
    rng = np.random.default_rng(0)
    for i in range(200):
        (tmp_path / f"m{i}.onnx").write_bytes(mutate(source, rng))
    script = textwrap.dedent(f"""
        import contextlib, io, sys
        from effc.cli import main
        codes = []
        for i in range(200):
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = main(["inspect", r"{tmp_path}/m%d.onnx" % i])
            lines = err.getvalue().strip().splitlines()
            if code not in (0, 2) or (code == 2 and len(lines) != 1):
                print("BAD", i, code, err.getvalue()[:300])
            codes.append(code)
        print("codes", sorted(set(codes)), codes.count(2))
    """)
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "BAD" not in run.stdout, run.stdout
    assert "codes [0, 2]" in run.stdout, run.stdout  # some mutations load, the rest are refused


@pytest.fixture(scope="module")
def bsr_file(tmp_path_factory):
    from _helpers import random_matrix

    path = tmp_path_factory.mktemp("bsr") / "w.safetensors"
    bsr_format.save({"w": random_matrix()[0]}, path)
    return path


@FUZZ
@given(st.integers(0, 2**32 - 1))
def test_bsr_reader_on_mutated_files(bsr_file, tmp_path_factory, seed):
    bad = tmp_path_factory.mktemp("m") / "w.safetensors"
    bad.write_bytes(mutate(bsr_file.read_bytes(), np.random.default_rng(seed)))
    try:
        bsr_format.load(bad)
    except EffcError:
        pass


@FUZZ
@given(st.integers(0, 2**32 - 1))
def test_compression_state_reader_on_mutated_files(tmp_path_factory, seed):
    folder = tmp_path_factory.mktemp("c")
    state = CompressionState(
        {
            "w": SiteState(
                group=16,
                bits=4,
                codes=torch.zeros(2, 1, 16, dtype=torch.uint8),
                scale=torch.ones(2, 1),
                zero=torch.zeros(2, 1, dtype=torch.uint8),
            )
        }
    )
    state.save(folder / "c.safetensors")
    data = (folder / "c.safetensors").read_bytes()
    (folder / "c.safetensors").write_bytes(mutate(data, np.random.default_rng(seed)))
    try:
        CompressionState.load(folder / "c.safetensors")
    except EffcError:
        pass


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from effc.compile import compile_model

    out = tmp_path_factory.mktemp("art") / "o"
    compile_model("builtin:tiny-cnn", "cleanup", out, verify=False)
    return out


@FUZZ
@given(st.integers(0, 2**32 - 1))
def test_manifest_reader_on_mutated_manifests(artifact, tmp_path_factory, seed):
    import shutil

    copy = tmp_path_factory.mktemp("a") / "o"
    shutil.copytree(artifact, copy)
    manifest = copy / "manifest.json"
    manifest.write_bytes(mutate(manifest.read_bytes(), np.random.default_rng(seed)))
    try:
        read_manifest(copy)
    except EffcError:
        pass


@FUZZ
@given(st.integers(0, 2**32 - 1))
def test_calibration_npz_on_mutated_files(tmp_path_factory, seed):
    from effc.ir.model import FxModel
    from effc.models import BUILTINS

    folder = tmp_path_factory.mktemp("n")
    np.savez(folder / "c.npz", pixels=np.zeros((2, 1, 3, 32, 32), np.float32))
    data = mutate((folder / "c.npz").read_bytes(), np.random.default_rng(seed))
    (folder / "c.npz").write_bytes(data)
    module = BUILTINS["tiny-cnn"][0]()
    try:
        from_npz(str(folder / "c.npz"), FxModel(module, module.example_inputs()))
    except EffcError:
        pass
