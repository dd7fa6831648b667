import json

import pytest

import effc
from effc.ir.onnx_io import save_onnx
from effc.ir.sites import read_weight, weight_sites, write_weight
from effc.testing import GoldenMismatch, assert_golden


@pytest.fixture
def exported(tmp_path, llama_onnx):
    return llama_onnx["dynamo"]


def test_write_then_match(tmp_path, exported):
    golden = tmp_path / "g.json"
    assert_golden(str(exported), golden, update=True)
    data = json.loads(golden.read_text())
    assert data["format"] == "effc-golden" and data["op_counts"]["MatMul"] >= 15
    assert data["sparsity"]["lm_head"] == 0.0
    assert_golden(str(exported), golden)


def test_missing_golden_is_an_error_not_silently_created(tmp_path, exported):
    with pytest.raises(GoldenMismatch, match="does not exist"):
        assert_golden(str(exported), tmp_path / "g.json")
    assert not (tmp_path / "g.json").exists()


def test_env_var_updates(tmp_path, exported, monkeypatch):
    monkeypatch.setenv("EFFC_UPDATE_GOLDEN", "1")
    assert_golden(str(exported), tmp_path / "g.json")
    assert (tmp_path / "g.json").is_file()


def test_changed_weights_fail_on_outputs_and_sparsity(tmp_path, exported):
    golden = tmp_path / "g.json"
    assert_golden(str(exported), golden, update=True)
    model = effc.load(str(exported))
    site = next(s for s in weight_sites(model) if s.fqn == "model.layers.0.mlp.down_proj")
    w = read_weight(site).clone()
    w[:, ::2] = 0
    write_weight(site, w)
    save_onnx(model.model, tmp_path / "pruned.onnx")
    with pytest.raises(GoldenMismatch) as err:
        assert_golden(str(tmp_path / "pruned.onnx"), golden)
    msg = str(err.value)
    assert "weight model.layers.0.mlp.down_proj: sparsity 0.5000, golden 0.0000" in msg
    assert "output 0: max abs error" in msg
    assert "op " not in msg and "structure" not in msg


def test_changed_graph_fails_on_op_counts_and_structure(tmp_path, llama_onnx):
    golden = tmp_path / "g.json"
    assert_golden(str(llama_onnx["legacy"]), golden, update=True)
    result = effc.Pipeline.from_text("cleanup").run(str(llama_onnx["legacy"]))
    save_onnx(result.model.model, tmp_path / "clean.onnx")
    with pytest.raises(GoldenMismatch) as err:
        assert_golden(str(tmp_path / "clean.onnx"), golden)
    assert "structure digest differs" in str(err.value) and "op Shape" in str(err.value)


def test_cli_golden_round_trip(tmp_path, exported, cli):
    golden = tmp_path / "g.json"
    assert cli("check", exported, "--golden", golden, "--update")[0] == 0
    code, out, _ = cli("check", exported, "--golden", golden)
    assert code == 0 and "matches" in out


def test_large_outputs_are_sampled(tmp_path, exported):
    from effc.testing import MAX_VALUES, make_golden

    data = make_golden(effc.load(str(exported)), 1e-4, 1e-5)
    out = data["outputs"][0]
    assert out["shape"] == [1, 16, 256] and len(out["values"]) <= MAX_VALUES
