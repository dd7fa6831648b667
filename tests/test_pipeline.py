from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import pytest

import effc
from effc.errors import PassFailedError, UnsupportedError, VerificationError
from effc.ir.model import FxModel, OnnxModel
from effc.pass_base import Pass, PassResult


class CountingPass(Pass):
    """Test helper: reports modified for its first ``times`` runs."""

    name = "counting"

    @dataclass
    class Options:
        times: int = 2

    def __init__(self, **kw):
        super().__init__(**kw)
        self.runs = 0

    def run(self, model, ctx):
        self.runs += 1
        return PassResult(model, self.runs <= self.options.times, {"run": self.runs})


class OnnxOnly(Pass):
    name = "onnx-only"
    kinds = ("onnx",)

    def run(self, model, ctx):
        return PassResult(model, False)


class FxOnly(Pass):
    name = "fx-only"
    kinds = ("fx",)

    def run(self, model, ctx):
        return PassResult(model, False)


class Boom(Pass):
    name = "boom"

    def run(self, model, ctx):
        raise ZeroDivisionError("division by zero")


class BreaksOutputs(Pass):
    """Claims to be lossless but scales the first weight: the verifier must catch it."""

    name = "breaks-outputs"

    def run(self, model, ctx):
        from effc.ir.sites import read_weight, weight_sites, write_weight

        site = weight_sites(model)[0]
        write_weight(site, read_weight(site) * 2)
        return PassResult(model, True)


def test_fixpoint_repeats_until_nothing_changes(tiny_cnn):
    counting = CountingPass(times=2)
    result = effc.Pipeline([effc.Pipeline([counting], group="fixpoint")]).run(tiny_cnn)
    assert counting.runs == 3  # two modifying runs, one that changes nothing
    assert [r.note for r in result.report.records] == ["", "iteration 2", "iteration 3"]


def test_fixpoint_stops_at_max_iter(tiny_cnn):
    counting = CountingPass(times=100)
    effc.Pipeline([effc.Pipeline([counting], group="fixpoint", max_iter=4)]).run(tiny_cnn)
    assert counting.runs == 4


def test_pipeline_lowers_fx_to_onnx_once_at_the_boundary(tiny_cnn):
    result = effc.Pipeline([FxOnly(), OnnxOnly(), OnnxOnly()]).run(
        FxModel(tiny_cnn, tiny_cnn.example_inputs())
    )
    kinds = [r.kind for r in result.report.records]
    assert kinds == ["fx", "fx->onnx", "onnx", "onnx"]
    assert isinstance(result.model, OnnxModel)
    assert any("lowered FX -> ONNX" in n for n in result.report.notes)


def test_fx_only_pass_on_onnx_is_a_clear_error(llama_onnx):
    with pytest.raises(
        UnsupportedError, match="pass 'fx-only' works on FX models, and this model is ONNX"
    ):
        effc.Pipeline([FxOnly()]).run(str(llama_onnx["dynamo"]))


def test_failure_names_the_pass_and_those_before_it(tiny_cnn):
    pipeline = effc.Pipeline([CountingPass(), effc.Pipeline.from_text("cleanup"), Boom()])
    with pytest.raises(PassFailedError) as err:
        pipeline.run(tiny_cnn)
    msg = str(err.value)
    assert "in pass 'boom'" in msg and "passes run before it: counting, cleanup" in msg
    assert "ZeroDivisionError" in msg


def test_verify_instrument_catches_a_lossless_pass_that_changes_outputs(tiny_cnn):
    from effc.models import TinyCNN

    model = TinyCNN()
    with pytest.raises(
        VerificationError, match="'breaks-outputs' is lossless but changed the outputs"
    ):
        effc.Pipeline([BreaksOutputs()], instruments=[effc.VerifyInstrument()]).run(model)


def test_dump_instrument_writes_ir_after_each_pass(tmp_path, llama_onnx, tiny_cnn):
    effc.Pipeline.from_text("cleanup,fuse", instruments=[effc.DumpInstrument(tmp_path / "a")]).run(
        str(llama_onnx["legacy"])
    )
    effc.Pipeline.from_text("fuse", instruments=[effc.DumpInstrument(tmp_path / "b")]).run(tiny_cnn)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "01-cleanup.onnx.txt",
        "02-fuse.onnx.txt",
    ]
    assert "Gather" in (tmp_path / "a" / "01-cleanup.onnx.txt").read_text()
    assert "conv2d" in (tmp_path / "b" / "01-fuse.fx.py").read_text()


def test_report_records_ops_params_bytes_and_json(tmp_path, tiny_cnn):
    result = effc.Pipeline.from_text("fuse", instruments=[effc.VerifyInstrument()]).run(tiny_cnn)
    (record,) = result.report.records
    assert record.ops_before["aten::batch_norm.default"] == 5
    assert "aten::batch_norm.default" not in record.ops_after
    assert record.params_after < record.params_before and record.bytes_after < record.bytes_before
    assert record.error["ok"] and record.error["max_abs"] < 1e-5
    result.report.save(tmp_path / "r.json")
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passes"][0]["op_delta"]["aten::batch_norm.default"] == -5
    assert data["summary"]["nodes_before"] == 17 and data["summary"]["nodes_after"] == 12


def test_pipeline_accepts_every_model_form(tiny_cnn, llama_onnx):
    pipeline = effc.Pipeline.from_text("cleanup")
    for model in (tiny_cnn, str(llama_onnx["dynamo"]), ir.load(llama_onnx["dynamo"])):
        assert pipeline.run(model).report.records[0].name == "cleanup"


def test_lossy_pass_error_is_measured_on_calibration_inputs(tiny_cnn):
    class Lossy(BreaksOutputs):
        name = "lossy-test"
        lossy = True

    from effc.models import TinyCNN

    model = TinyCNN()
    x = model.example_inputs()["pixels"].numpy()
    ctx = effc.PassContext(calibration=[{"pixels": x}, {"pixels": np.flip(x, -1).copy()}])
    (record,) = effc.Pipeline([Lossy()]).run(model, ctx).report.records
    assert record.error is not None and record.error["max_abs"] > 1e-3


def test_preflight_checks_run_before_any_pass(tiny_cnn, monkeypatch):
    """A missing or misshapen calibration set and NaN weights stop the pipeline before any pass
    (or the verifier) runs the model."""
    import copy

    import numpy as np
    import torch

    from effc.errors import InputError
    from effc.ir.model import FxModel

    runs = []
    monkeypatch.setattr(FxModel, "run", lambda self, x: runs.append(x))
    model = copy.deepcopy(tiny_cnn)
    with pytest.raises(InputError, match="pass 'group-prune' needs calibration inputs"):
        effc.Pipeline.from_text("cleanup,group-prune").run(model)
    bad = [{"pixels": np.zeros((1, 3, 16), np.float32)}]
    with pytest.raises(InputError, match="calibration sample 0: input 'pixels' has shape"):
        effc.Pipeline.from_text("group-prune").run(model, effc.PassContext(calibration=bad))
    nan = [{"pixels": np.full((1, 3, 32, 32), np.nan, np.float32)}]
    with pytest.raises(InputError, match="NaN or Inf values"):
        effc.Pipeline.from_text("group-prune").run(model, effc.PassContext(calibration=nan))
    wrong = [{"pixels": torch.zeros((1, 3, 32, 32), dtype=torch.float64)}]
    with pytest.raises(InputError, match="'pixels' has dtype float64, the model wants float32"):
        effc.Pipeline.from_text("group-prune").run(model, effc.PassContext(calibration=wrong))
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN or Inf weights: classifier.weight"):
        effc.Pipeline.from_text("cleanup").run(model)
    assert runs == []


def test_calibration_may_be_torch_tensors(tiny_cnn):
    """The Python API takes calibration samples as torch tensors as well as numpy arrays, with
    the same result."""
    import copy

    import torch

    x = [tiny_cnn.example_inputs() for _ in range(2)]  # torch tensors
    ref = effc.Pipeline.from_text("kernel-sparsity{sparsity=0.5,score=obs}").run(
        copy.deepcopy(tiny_cnn),
        effc.PassContext(calibration=[{k: v.numpy() for k, v in s.items()} for s in x]),
    )
    got = effc.Pipeline.from_text("kernel-sparsity{sparsity=0.5,score=obs}").run(
        copy.deepcopy(tiny_cnn), effc.PassContext(calibration=x)
    )
    from effc.ir.sites import read_weight, weight_sites

    pairs = list(zip(weight_sites(ref.model), weight_sites(got.model)))
    assert pairs and all(torch.equal(read_weight(a), read_weight(b)) for a, b in pairs)
