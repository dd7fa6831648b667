"""--target bsr end to end: passes on FX, lowering, BSR kernel nodes in ONNX, effc run."""

import json

import numpy as np
import pytest

import effc
from effc.runtime.modules import choose


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from effc.compile import compile_model
    from effc.models import BUILTINS

    out = tmp_path_factory.mktemp("bsr") / "out"
    model = BUILTINS["tiny-llama"][0]()
    text = (
        "group-prune{score=magnitude,sparsity=0.5},quantize{bits=4,group=16},bsr-pack{decide=false}"
    )
    result = compile_model(model, text, out, target="bsr")
    reference = effc.Pipeline.from_text(
        "group-prune{score=magnitude,sparsity=0.5},quantize{bits=4,group=16}"
    ).run(BUILTINS["tiny-llama"][0]())
    return out, result, reference.model


def test_every_linear_becomes_a_bsr_node(compiled):
    out, result, _ = compiled
    ops = result.model.op_histogram()
    assert ops["ai.onnx.contrib::BSRMatMul"] == 15
    assert ops.get("MatMul", 0) == 4  # attention score/value products stay MatMul
    packs = [r for r in result.report.records if r.name == "bsr-pack"]
    assert len(packs) == 1  # the target does not append a second bsr-pack to a pipeline naming one
    pack = packs[0]
    assert pack.stats["layers_packed"] == 15 and pack.stats["layers_dense"] == 0
    assert pack.bytes_after < pack.bytes_before / 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "bsr"
    assert "bsr-pack" in manifest["pipeline"]


def test_effc_run_matches_the_fake_quantized_model(compiled, tmp_path, cli):
    out, _, reference = compiled
    x = {"input_ids": np.random.default_rng(0).integers(0, 256, (1, 16)).astype(np.int64)}
    np.savez(tmp_path / "x.npz", **x)
    code, _, err = cli("run", out, "--inputs", tmp_path / "x.npz", "--out", tmp_path / "y.npz")
    assert code == 0, err
    with np.load(tmp_path / "y.npz") as y:
        (logits,) = [y[k] for k in y.files]
    np.testing.assert_allclose(logits, reference.run(x)[0], rtol=1e-4, atol=1e-4)


def test_bsr_pack_without_quantization_changes_nothing(tiny_llama, llama_onnx):
    result = effc.Pipeline.from_text("bsr-pack").run(str(llama_onnx["dynamo"]))
    assert result.report.records[0].stats["layers_packed"] == 0 and not result.modified


def test_cli_bsr_target_decides_per_layer(tmp_path, cli):
    code, _, err = cli(
        "compile",
        "builtin:tiny-llama",
        "--passes",
        "quantize{bits=8,group=16}",
        "--target",
        "bsr",
        "-o",
        tmp_path / "o",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    pack = next(p for p in report["passes"] if p["name"] == "bsr-pack")
    for layer in pack["stats"]["layers"]:
        assert layer["choice"] == choose(layer["sparse_ms"], layer["dense_ms"])


def test_int8_activation_mode_is_lossy_measured_and_close(tmp_path, compiled):
    """bsr-pack{activations=int8}: every int4 node says so, the pass is reported lossy with its
    measured error, and effc run stays close to the fp32-activation artifact (not equal)."""
    from effc.compile import compile_model
    from effc.models import BUILTINS

    fp32_out, _, _ = compiled
    text = (
        "group-prune{score=magnitude,sparsity=0.5},quantize{bits=4,group=16},"
        "bsr-pack{decide=false,activations=int8}"
    )
    calib = [
        {"input_ids": np.random.default_rng(i).integers(0, 256, (1, 16)).astype(np.int64)}
        for i in range(2)
    ]
    result = compile_model(
        BUILTINS["tiny-llama"][0](),
        text,
        tmp_path / "a8",
        target="bsr",
        ctx=effc.PassContext(calibration=calib),
    )
    ops = result.model.op_histogram()
    assert ops["ai.onnx.contrib::BSRMatMulA8"] == 15 and "ai.onnx.contrib::BSRMatMul" not in ops
    pack = next(r for r in result.report.records if r.name == "bsr-pack")
    assert pack.lossy and pack.stats["activations"] == "int8"
    assert 0 < pack.error["max_abs"] < 1.0
    from effc.backends import bsr

    x = {"input_ids": np.random.default_rng(5).integers(0, 256, (1, 16)).astype(np.int64)}
    (a8,) = bsr.run(tmp_path / "a8", x).values()
    (fp32,) = bsr.run(fp32_out, x).values()
    assert not np.array_equal(a8, fp32)
    assert np.abs(a8 - fp32).max() <= 0.05 * np.abs(fp32).max()


def test_decisions_can_be_pinned_from_a_file_or_an_earlier_report(tmp_path, cli):
    import json

    text = "group-prune{score=magnitude},quantize{bits=4,group=16}"
    code, _, err = cli(
        "compile", "builtin:tiny-llama", "--passes", text, "--target", "bsr", "-o", tmp_path / "a"
    )
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    first = {r["layer"]: r["choice"] for r in report["passes"][-1]["stats"]["layers"]}
    assert all("sparse_ms" in r for r in report["passes"][-1]["stats"]["layers"])
    flipped = {k: "dense" if v == "sparse" else "sparse" for k, v in first.items()}
    (tmp_path / "d.json").write_text(json.dumps(flipped))
    for source, want in ((tmp_path / "d.json", flipped), (tmp_path / "a" / "report.json", first)):
        out = tmp_path / f"o-{source.stem}"
        code, _, err = cli(
            "compile",
            "builtin:tiny-llama",
            "--passes",
            f'{text},bsr-pack{{decisions="{source}"}}',
            "--target",
            "bsr",
            "-o",
            out,
        )
        assert code == 0, err
        layers = json.loads((out / "report.json").read_text())["passes"][-1]["stats"]["layers"]
        assert {r["layer"]: r["choice"] for r in layers} == want
        assert all(r.get("pinned") for r in layers)
    (tmp_path / "bad.json").write_text('{"lm_head": "maybe"}')
    code, _, err = cli(
        "compile",
        "builtin:tiny-llama",
        "--passes",
        f'{text},bsr-pack{{decisions="{tmp_path / "bad.json"}"}}',
        "--target",
        "bsr",
        "-o",
        tmp_path / "bad",
    )
    assert code == 2 and "sparse" in err


def test_dense_layers_stay_codes_and_decisions_are_timed_in_onnxruntime(tmp_path, cli):
    """A layer pinned (or timed) dense becomes MatMulNBits of its codes, not an fp32 MatMul: the
    artifact keeps no fp32 copy of a quantized weight, and runs equal to the all-sparse one. The
    timings are onnxruntime's, against that dense form."""
    import onnx

    text = "group-prune{score=magnitude},quantize{bits=4,group=16}"
    layers = [f"model.layers.{i}" for i in range(2)]
    pins = {}
    outs = {}
    for name in ("sparse", "dense"):
        out = tmp_path / name
        if name == "dense":
            (tmp_path / "pins.json").write_text(json.dumps(pins))
            extra = f',bsr-pack{{decisions="{tmp_path / "pins.json"}"}}'
        else:
            extra = ""
        code, _, err = cli(
            "compile", "builtin:tiny-llama", "--passes", text + extra, "--target", "bsr", "-o", out
        )
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        records = report["passes"][-1]["stats"]["layers"]
        if name == "sparse":
            for r in records:
                assert r["dense_form"] == "MatMulNBits" and r["sparse_ms"] > 0
                assert r["choice"] == choose(r["sparse_ms"], r["dense_ms"])
            pins = {
                r["layer"]: ("dense" if r["layer"].startswith(tuple(layers)) else "sparse")
                for r in records
            }
        outs[name] = out
    stored = onnx.load(str(outs["dense"] / "model.onnx"))
    ops = [n.op_type for n in stored.graph.node]
    dense_layers = sum(1 for v in pins.values() if v == "dense")
    assert ops.count("MatMulNBits") == dense_layers > 0
    assert ops.count("BSRMatMul") == len(pins) - dense_layers
    big_float = [
        t.name
        for t in stored.graph.initializer
        if t.data_type == 1 and len(t.dims) == 2 and min(t.dims) >= 64 and "embed" not in t.name
    ]
    assert not big_float, big_float
    from effc.backends import bsr

    x = {"input_ids": np.random.default_rng(3).integers(0, 256, (1, 16)).astype(np.int64)}
    (a,) = bsr.run(outs["sparse"], x).values()
    (b,) = bsr.run(outs["dense"], x).values()
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
