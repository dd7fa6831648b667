"""The CLI end to end: every command, and bad input as one line with exit code 2."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _helpers import one_line_error


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from effc.cli import main

    out = tmp_path_factory.mktemp("art") / "out"
    assert main(["compile", "builtin:tiny-cnn", "--passes", "cleanup,fuse", "-o", str(out)]) == 0
    return out


def test_compile_writes_manifest_model_and_report(artifact):
    assert sorted(p.name for p in artifact.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "report.json",
    ]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["manifest_version"] == 1 and manifest["backend"] == "onnxruntime"
    assert manifest["pipeline"] == "cleanup,fuse,weight-codes"  # the target appends its pass
    assert manifest["inputs"] == [{"name": "pixels", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert set(manifest["files"]) == {"model.onnx", "report.json"}
    report = json.loads((artifact / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == [
        "cleanup",
        "fuse",
        "lower-fx-onnx",
        "weight-codes",
    ]
    assert report["passes"][1]["stats"]["batchnorm"] == 5


def test_run_checks_hashes_and_writes_outputs(artifact, tmp_path, cli, tiny_cnn):
    x = tiny_cnn.example_inputs()["pixels"].numpy()
    np.savez(tmp_path / "x.npz", pixels=x)
    code, out, err = cli(
        "run", artifact, "--inputs", tmp_path / "x.npz", "--out", tmp_path / "y.npz"
    )
    assert code == 0, err
    with np.load(tmp_path / "y.npz") as y:
        (logits,) = [y[k] for k in y.files]
    np.testing.assert_allclose(
        logits, tiny_cnn(tiny_cnn.example_inputs()["pixels"]).detach().numpy(), rtol=1e-4, atol=1e-5
    )


def test_run_refuses_a_tampered_artifact(artifact, tmp_path, cli):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    one_line_error(*cli("run", copy), "does not match its sha256")
    (copy / "model.onnx").unlink()
    one_line_error(*cli("run", copy), "model.onnx is missing")


def test_run_refuses_inputs_of_the_wrong_shape(artifact, tmp_path, cli):
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((1, 3, 16, 16), np.float32))
    one_line_error(
        *cli("run", artifact, "--inputs", tmp_path / "bad.npz"),
        "input 'pixels' has shape [1, 3, 16, 16]",
    )


def test_output_folder_exists_needs_force(artifact, cli, tmp_path):
    one_line_error(
        *cli("compile", "builtin:tiny-cnn", "--passes", "cleanup", "-o", artifact),
        "already exists; pass --force",
    )
    copy = tmp_path / "forced"
    shutil.copytree(artifact, copy)
    code, _, err = cli("compile", "builtin:tiny-cnn", "--passes", "cleanup", "-o", copy, "--force")
    assert code == 0, err
    assert json.loads((copy / "manifest.json").read_text())["pipeline"] == "cleanup,weight-codes"


def test_failure_while_writing_leaves_no_partial_output(tmp_path, cli, monkeypatch):
    from effc.backends import onnxruntime as backend

    def broken(model, folder):
        (folder / "model.onnx").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(backend, "lower", broken)
    code, _, err = cli("compile", "builtin:tiny-cnn", "--passes", "cleanup", "-o", tmp_path / "out")
    assert code == 2 and "disk full" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, match",
    [
        (["compile", "missing.onnx", "--passes", "cleanup", "-o", "{tmp}/o"], "no such file"),
        (
            ["compile", "builtin:tiny-cnn", "--passes", "cleanp", "-o", "{tmp}/o"],
            "did you mean 'cleanup'",
        ),
        (
            ["compile", "builtin:tiny-cnn", "--passes", "fuse{rulez=[x]}", "-o", "{tmp}/o"],
            "unknown option 'rulez'",
        ),
        (
            ["compile", "builtin:tiny-cnn", "--passes", "cleanup{max_iter=x}", "-o", "{tmp}/o"],
            "expects an integer",
        ),
        (
            ["compile", "builtin:nope", "--passes", "cleanup", "-o", "{tmp}/o"],
            "unknown builtin model 'nope'",
        ),
        (["compile", "{tmp}", "--passes", "cleanup", "-o", "{tmp}/o"], "not a model reference"),
        (
            [
                "compile",
                "builtin:tiny-cnn",
                "--passes",
                "cleanup",
                "-o",
                "{tmp}/o",
                "--target",
                "tensorrtt",
            ],
            "unknown target",
        ),
        (
            ["compile", "py:nosuchmodule:f", "--passes", "cleanup", "-o", "{tmp}/o"],
            "No module named",
        ),
        (["inspect", "{tmp}/random.onnx"], "not a valid ONNX"),
        (["inspect", "{tmp}/lfs.onnx"], "Git LFS pointer"),
        (["run", "{tmp}"], "no manifest.json"),
        (["export", "builtin:tiny-cnn", "-o", "{tmp}"], "is a folder"),
        (["check", "builtin:tiny-cnn"], "needs a second model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, match, tmp_path, cli):
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(1).bytes(1000))
    (tmp_path / "lfs.onnx").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    one_line_error(*cli(*[a.replace("{tmp}", str(tmp_path)) for a in args]), match)
    assert not (tmp_path / "o").exists()


def test_fx_only_pass_on_onnx_model_is_exit_2(tmp_path, cli, llama_onnx, monkeypatch):
    from dataclasses import dataclass

    from effc.pass_base import Pass, PassResult
    from effc.registry import PASSES

    class Train(Pass):
        name = "train-test"
        kinds = ("fx",)

        @dataclass
        class Options:
            steps: int = 1

        def run(self, model, ctx):
            return PassResult(model, False)

    monkeypatch.setitem(PASSES, "train-test", Train)
    one_line_error(
        *cli("compile", llama_onnx["dynamo"], "--passes", "train-test", "-o", tmp_path / "o"),
        "training needs a torch model",
    )


def test_calibration_of_the_wrong_shape_is_exit_2(tmp_path, cli):
    np.savez(tmp_path / "calib.npz", pixels=np.zeros((4, 3, 8, 8), np.float32))
    one_line_error(
        *cli(
            "compile",
            "builtin:tiny-cnn",
            "--passes",
            "cleanup",
            "-o",
            tmp_path / "o",
            "--calib",
            tmp_path / "calib.npz",
        ),
        "input 'pixels' has shape [3, 8, 8]",
    )


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "effc.cli", "inspect", str(tmp_path / "missing.onnx"), "--debug"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "InputError" in proc.stderr


def test_export_inspect_and_check(tmp_path, cli):
    code, _, err = cli("export", "builtin:tiny-llama", "-o", tmp_path / "a.onnx")
    assert code == 0, err
    code, _, err = cli(
        "export", "builtin:tiny-llama", "-o", tmp_path / "b.onnx", "--legacy", "--opset", "14"
    )
    assert code == 0, err
    one_line_error(
        *cli("export", "builtin:tiny-llama", "-o", tmp_path / "b.onnx"), "already exists"
    )
    code, out, _ = cli("inspect", tmp_path / "b.onnx", "--json")
    info = json.loads(out)
    assert info["opset"]["ai.onnx"] == 14 and info["nodes"] > 100
    assert len(info["blocks"]) == 2 and info["weights"][-1]["name"] == "lm_head"
    code, out, _ = cli("inspect", tmp_path / "a.onnx")
    assert code == 0 and "op histogram" in out and "model.layers.1.mlp.down_proj" in out
    code, out, _ = cli("check", tmp_path / "a.onnx", tmp_path / "b.onnx")
    assert code == 0 and "equal within tolerance" in out
    code, out, _ = cli("check", tmp_path / "a.onnx", "builtin:tiny-llama")
    assert code == 0, out


def test_check_reports_different_models_with_exit_1(tmp_path, cli):
    from effc.ir.onnx_io import save_onnx
    from effc.ir.sites import read_weight, weight_sites, write_weight
    from effc.ir.torch_io import load_model

    assert cli("export", "builtin:tiny-cnn", "-o", tmp_path / "a.onnx")[0] == 0
    model = load_model(str(tmp_path / "a.onnx"))
    site = weight_sites(model)[0]
    write_weight(site, read_weight(site) * 1.5)
    save_onnx(model.model, tmp_path / "b.onnx")
    code, out, _ = cli("check", tmp_path / "a.onnx", tmp_path / "b.onnx")
    assert code == 1 and out.startswith("DIFFERENT")


def test_list_passes_comes_from_the_declarations(cli):
    code, out, _ = cli("list-passes", "--json")
    passes = {p["name"]: p for p in json.loads(out)}
    assert passes["cleanup"]["options"] == [
        {"name": "max_iter", "type": "an integer", "default": 5}
    ]
    code, out, _ = cli("list-passes")
    assert "fuse" in out and "matmul-add" in out and "fixpoint" in out


def test_compile_onnx_input_with_dump_ir(tmp_path, cli, llama_onnx):
    code, _, err = cli(
        "compile",
        llama_onnx["legacy"],
        "--passes",
        "fixpoint(cleanup,fuse)",
        "-o",
        tmp_path / "o",
        "--dump-ir",
        tmp_path / "ir",
    )
    assert code == 0, err
    assert (tmp_path / "ir" / "01-cleanup.onnx.txt").is_file()
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["summary"]["nodes_after"] < report["summary"]["nodes_before"]


def test_exit_codes_user_errors_are_2(tmp_path, cli, llama_onnx):
    code, _, err = cli("inspect", "builtin:tiny-cnn", "--threads", "0")
    assert code == 2 and "positive integer" in err
    # --shape that names an input the model does not have
    code, _, err = cli("check", "builtin:tiny-cnn", llama_onnx["dynamo"], "--shape", "x=1x3x32x32")
    assert code == 2 and "--shape names x" in err
    code, _, err = cli("check", "builtin:tiny-cnn", "--golden", tmp_path / "none.json")
    assert code == 2 and "--update" in err and len(err.strip().splitlines()) == 1


def test_a_golden_file_of_another_model_is_a_difference_not_a_crash(tmp_path, cli, llama_onnx):
    golden = tmp_path / "g.json"
    assert cli("check", "builtin:tiny-cnn", "--golden", golden, "--update")[0] == 0
    code, _, err = cli("check", llama_onnx["dynamo"], "--golden", golden)
    assert code == 1 and "differ from the golden file's" in err


def test_internal_errors_have_their_own_exit_code(tmp_path, cli, monkeypatch):
    import effc.cli

    def bug(*a, **k):
        raise KeyError("oops")

    monkeypatch.setattr(effc.cli, "inspect_model", bug)
    code, _, err = cli("inspect", "builtin:tiny-cnn")
    assert code == effc.cli.EXIT_INTERNAL == 3 and "--debug" in err


def test_a_closed_pipe_stops_quietly_and_modules_here_are_found(tmp_path):
    import subprocess
    import sys

    (tmp_path / "mymodel.py").write_text(
        "import torch\n\n\nclass M(torch.nn.Linear):\n"
        "    def example_inputs(self):\n        return {'input': torch.randn(1, 4)}\n\n\n"
        "def build():\n    return M(4, 2)\n"
    )
    run = subprocess.run(
        f"{sys.executable} -m effc.cli inspect builtin:tiny-llama | head -1; "
        f"echo rc=${{PIPESTATUS[0]}}; {sys.executable} -m effc.cli inspect py:mymodel:build",
        shell=True,
        executable="/bin/bash",
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert "rc=141" in run.stdout and "Traceback" not in run.stderr, run.stderr
    assert "M: FX, 1 nodes, 10 parameters" in run.stdout, run.stderr


def test_artifact_folders_get_the_usual_permissions(tmp_path, cli):
    import os
    import stat

    assert cli("compile", "builtin:tiny-cnn", "--passes", "cleanup", "-o", tmp_path / "o")[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o777 & ~umask


def test_run_compare_prints_size_speed_and_error_beside_the_source(tmp_path, cli):
    out = tmp_path / "o"
    code, _, err = cli(
        "compile", "builtin:tiny-llama", "--passes", "quantize{bits=4,group=16}", "-o", out
    )
    assert code == 0, err
    code, stdout, err = cli("run", out, "--compare", "builtin:tiny-llama")
    assert code == 0, err
    rows = [
        line
        for line in stdout.splitlines()
        if line.startswith("│") and ("reference" in line or "artifact" in line)
    ]
    assert len(rows) == 2 and "1.00x" in rows[0] and "MiB" in rows[1], stdout
    ref_size, art_size = (float(r.split("│")[2].split()[0]) for r in rows)
    assert art_size < ref_size  # int4 codes
