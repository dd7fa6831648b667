"""Real trained models from shared DATA.md. Skipped, with the reason, when their packages are
missing; CI installs them (requirements-models.txt)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from _helpers import real_folder

import effc

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm_exports(tmp_path_factory):
    from effc.ir.onnx_io import save_onnx
    from effc.ir.torch_io import export_onnx, load_hf_folder
    from effc.models.real import minilm_folder

    module, inputs = load_hf_folder(real_folder(minilm_folder), seq=32)
    folder = tmp_path_factory.mktemp("minilm")
    paths = {}
    for kind in ("legacy", "dynamo"):
        legacy = kind == "legacy"
        save_onnx(
            export_onnx(module, inputs, legacy=legacy, opset=14 if legacy else None),
            folder / f"{kind}.onnx",
        )
        paths[kind] = str(folder / f"{kind}.onnx")
    return paths


def _shape_ops(ops: dict) -> int:
    return sum(
        ops.get(op, 0) for op in ("Shape", "ConstantOfShape", "Concat", "Gather", "Unsqueeze")
    )


def test_minilm_legacy_export_loses_its_shape_chains_and_stays_equal(minilm_exports):
    from effc.check import check_models

    result = effc.Pipeline.from_text("cleanup,fuse", instruments=[effc.VerifyInstrument()]).run(
        minilm_exports["legacy"]
    )
    cleanup = result.report.records[0]
    before, after = (
        sum(cleanup.ops_before.values()),
        sum(result.report.records[-1].ops_after.values()),
    )
    assert cleanup.ops_before["Shape"] > 0 and "Shape" not in cleanup.ops_after
    assert _shape_ops(cleanup.ops_after) < _shape_ops(cleanup.ops_before)
    assert after < before - 50, (before, after)
    check = check_models(effc.load(minilm_exports["legacy"]), result.model, seeds=3)
    assert check["ok"], check


def test_minilm_dynamo_export_only_loses_layout_ops_and_stays_identical(minilm_exports):
    """The dynamo export is already optimised (cleanup finds at most a constant lookup to fold);
    what is left are the attention head split/merge
    chains (Reshape + Transpose + Transpose for K^T, ...), which layout-chains shortens."""
    from effc.check import check_models

    result = effc.Pipeline.from_text("cleanup,fuse").run(minilm_exports["dynamo"])
    cleanup, fuse = result.report.records
    # at most a constant lookup folds (the token-type embedding of constant ids)
    assert cleanup.stats["nodes_removed"] == cleanup.stats["constants_folded"] <= 2, cleanup.stats
    assert {k for k, v in fuse.stats.items() if v} == {"layout-chains"}
    layout = ("Reshape", "Transpose")
    assert sum(fuse.ops_after[k] for k in layout) < sum(fuse.ops_before[k] for k in layout)
    assert check_models(effc.load(minilm_exports["dynamo"]), result.model, seeds=2)["identical"]


def test_minilm_sites_and_blocks(minilm_exports):
    from effc.ir.blocks import find_blocks
    from effc.ir.sites import weight_sites

    for path in minilm_exports.values():
        model = effc.load(path)
        names = [s.fqn for s in weight_sites(model)]
        assert len(names) == 6 * 6 + 1 and names[-1] == "pooler.dense", names
        assert "encoder.layer.0.attention.self.query" in names
        assert [b.fqn for b in find_blocks(model)] == [f"encoder.layer.{i}" for i in range(6)]


@pytest.mark.slow
def test_smollm2_fx_and_onnx_have_the_same_sites_and_30_blocks():
    from effc.ir.blocks import find_blocks
    from effc.ir.model import FxModel, OnnxModel
    from effc.ir.sites import read_weight, weight_sites
    from effc.ir.torch_io import export_onnx, load_hf_folder
    from effc.models.real import smollm2_folder

    module, inputs = load_hf_folder(real_folder(smollm2_folder), seq=8)
    fx_sites = weight_sites(FxModel(module, inputs))
    onnx_sites = weight_sites(OnnxModel(export_onnx(module, inputs)))
    assert [s.fqn for s in fx_sites] == [s.fqn for s in onnx_sites]
    assert len(fx_sites) == 30 * 7 + 1
    head = fx_sites[-1]
    assert head.fqn == "lm_head" and head.tied_with == ["model.embed_tokens"]
    assert onnx_sites[-1].tied_with == ["model.embed_tokens"]
    for a, b in zip(fx_sites, onnx_sites):
        assert a.shape == b.shape
        np.testing.assert_array_equal(read_weight(a).numpy(), read_weight(b).numpy(), err_msg=a.fqn)
    for sites in (fx_sites, onnx_sites):
        blocks = find_blocks(sites)
        assert [b.fqn for b in blocks] == [f"model.layers.{i}" for i in range(30)]


def test_text_calibration_from_an_hf_folder(tmp_path, cli):
    from effc.models.real import minilm_folder

    folder = real_folder(minilm_folder)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    code, _, err = cli(
        "compile",
        folder,
        "--passes",
        "group-prune{sparsity=0.25}",
        "-o",
        tmp_path / "o",
        "--calib",
        text,
        "--calib-samples",
        "2",
        "--calib-seqlen",
        "32",
        "--no-verify",
    )
    assert code == 0, err
    import json

    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["calibration"] == {"file": str(text), "samples": 2, "seqlen": 32}
    assert report["passes"][0]["stats"]["sparsity"] == 0.25
    code, _, err = cli(
        "compile",
        "builtin:tiny-llama",
        "--passes",
        "group-prune",
        "-o",
        tmp_path / "p",
        "--calib",
        text,
    )
    assert code == 2 and "needs the model's tokenizer" in err


def test_minilm_legacy_layernorms_fuse_exactly(minilm_exports):
    """The opset-14 export writes LayerNorm as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add:
    all 13 (embeddings + 2 per layer) become LayerNormalization; outputs stay within fp32."""
    from effc.check import check_models

    text = "fixpoint(cleanup,fuse),layernorm,fixpoint(cleanup,fuse)"
    result = effc.Pipeline.from_text(text, instruments=[effc.VerifyInstrument()]).run(
        minilm_exports["legacy"]
    )
    ln = next(r for r in result.report.records if r.name == "layernorm")
    assert ln.stats["decomposed_fused"] == 13 and ln.stats["sites"] == 13
    assert ln.ops_after["LayerNormalization"] == 13 and "Pow" not in ln.ops_after
    assert result.model.model.opset_imports[""] == 18
    check = check_models(effc.load(minilm_exports["legacy"]), result.model, seeds=3)
    assert check["ok"], check
