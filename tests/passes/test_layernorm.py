"""layernorm: exact forms (ONNX), calibrated affine and RMS (FX and ONNX), trained tanh (FX)."""

import numpy as np
import pytest
import torch
from _helpers import from_text, op_types

import effc
from effc.errors import InputError, UnsupportedError
from effc.ir.model import FxModel, OnnxModel
from effc.ir.torch_io import export_onnx


def _ditn(seed: int = 0, **cfg):
    from effc.models.ditn import DITN, DITNConfig

    torch.manual_seed(seed)
    model = DITN(DITNConfig(**cfg)).eval()
    with torch.no_grad():  # LayerNorm affine and the rest away from their init values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _calib(n: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(7)
    return [{"x": torch.rand(1, 3, size, size, generator=g).numpy()} for _ in range(n)]


def _run(text: str, model, calib=None):
    ctx = effc.PassContext(calibration=calib or [])
    return effc.Pipeline.from_text(text, instruments=[effc.VerifyInstrument()]).run(model, ctx)


@pytest.mark.parametrize("legacy", [False, True])
def test_exact_mode_on_ditn_removes_the_transposes_and_keeps_the_outputs(legacy):
    model = _ditn()
    x = model.example_inputs(size=16)
    onnx_model = OnnxModel(export_onnx(model, x, legacy=legacy))
    result = _run("cleanup,layernorm,fixpoint(cleanup,fuse)", onnx_model)
    ln = next(r for r in result.report.records if r.name == "layernorm")
    assert ln.stats["sites"] == 6 and ln.stats["channel_rewritten"] == 6
    assert ln.stats["decomposed_fused"] == (6 if legacy else 0)
    assert ln.error["ok"]  # the verifier held it to fp32 tolerance
    before, after = result.report.records[0].ops_before, result.report.records[-1].ops_after
    assert after.get("Transpose", 0) == before["Transpose"] - 12  # to_3d / to_4d pairs gone
    assert "LayerNormalization" not in after and "Pow" not in after
    with torch.no_grad():
        expected = model(**x).numpy()
    np.testing.assert_allclose(result.model.run({"x": x["x"].numpy()})[0], expected, atol=1e-4)


def test_decomposed_last_axis_layernorm_fuses_and_opset_is_raised():
    inits = {"g": np.linspace(0.5, 1.5, 8, dtype=np.float32), "b": np.ones(8, np.float32)}
    model = from_text(
        """<ir_version: 8, opset_import: ["" : 14]>
        g (float[2,5,8] x) => (float[2,5,8] y) {
            m = ReduceMean<axes = [-1]>(x)
            d = Sub(x, m)
            two = Constant<value = float {2.0}>()
            p = Pow(d, two)
            v = ReduceMean<axes = [-1]>(p)
            e = Constant<value = float {0.00001}>()
            a = Add(v, e)
            s = Sqrt(a)
            n = Div(d, s)
            k = Mul(n, g)
            y = Add(k, b)
        }""",
        inits,
    )
    x = {"x": np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)}
    ref = model.run(x)[0]
    result = _run("layernorm", model)
    assert op_types(result.model) == ["LayerNormalization"]
    assert result.model.model.opset_imports[""] >= 17
    np.testing.assert_allclose(result.model.run(x)[0], ref, rtol=1e-5, atol=1e-6)


def test_affine_mode_folds_into_the_pointwise_convs_and_reports_its_error():
    model = _ditn()
    onnx_model = OnnxModel(export_onnx(model, model.example_inputs(size=16)))
    calib = _calib()
    result = effc.Pipeline.from_text("layernorm{mode=affine},fixpoint(fuse)").run(
        onnx_model, effc.PassContext(calibration=calib)
    )
    ln = result.report.records[0]
    assert ln.lossy and ln.stats["replaced"] == 6
    assert 0 < ln.error["max_abs"] < 10  # measured, not zero: an approximation
    after = result.report.records[-1].ops_after
    assert "LayerNormalization" not in after and "ReduceMean" not in after
    # 5 of 6 norms feed only a 1x1 conv: their Mul/Add are folded away
    assert after.get("Mul", 0) <= result.report.records[0].ops_before.get("Mul", 0) + 2


def test_affine_and_rms_modes_on_fx():
    model = _ditn()
    fx = FxModel(model, model.example_inputs(size=16))
    calib = _calib()
    result = _run("layernorm{mode=affine}", fx, calib)
    assert result.report.records[0].stats["replaced"] == 6
    assert "aten::layer_norm.default" not in result.report.records[0].ops_after
    model = _ditn()
    fx = FxModel(model, model.example_inputs(size=16))
    keep_all = _run("layernorm{mode=rms,max_mean_ratio=0}", fx, calib).report.records[0]
    assert keep_all.stats["replaced"] == 0
    replace_all = _run("layernorm{mode=rms,max_mean_ratio=1}", fx, calib).report.records[0]
    assert replace_all.stats["replaced"] == 6


def test_rms_mode_is_exact_when_the_mean_is_zero():
    """LayerNorm of zero-mean rows is RMSNorm: the substitution's error is rounding only."""

    class ZeroMean(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(16)
            with torch.no_grad():
                self.ln.weight.uniform_(0.5, 1.5)
                self.ln.bias.uniform_(-1, 1)

        def forward(self, x):
            return self.ln(x - x.mean(-1, keepdim=True))

    module = ZeroMean().eval()
    x = {"x": torch.randn(4, 16)}
    calib = [{"x": torch.randn(4, 16).numpy()} for _ in range(2)]
    for model in (FxModel(module, x), OnnxModel(export_onnx(module, x))):
        result = effc.Pipeline.from_text("layernorm{mode=rms}").run(
            model, effc.PassContext(calibration=calib)
        )
        record = result.report.records[0]
        assert record.stats["replaced"] == 1 and record.error["max_abs"] < 1e-5


def test_tanh_mode_distills_on_fx_and_refuses_onnx():
    model = _ditn()
    fx = FxModel(model, model.example_inputs(size=16))
    result = effc.Pipeline.from_text("layernorm{mode=tanh,steps=60,lr=0.01}").run(
        fx, effc.PassContext(calibration=_calib())
    )
    stats = result.report.records[0].stats
    assert stats["replaced"] == 6
    assert stats["distill"]["mse_last"] < stats["distill"]["mse_first"]
    assert "aten::tanh.default" in result.report.records[0].ops_after
    onnx_model = OnnxModel(export_onnx(_ditn(), {"x": torch.rand(1, 3, 16, 16)}))
    with pytest.raises(UnsupportedError, match="torch model"):
        effc.Pipeline.from_text("layernorm{mode=tanh}").run(
            onnx_model, effc.PassContext(calibration=_calib())
        )


@pytest.mark.parametrize("mode", ["affine", "rms", "tanh"])
def test_calibrated_modes_need_calibration(mode):
    model = _ditn()
    with pytest.raises(InputError, match="calibration"):
        effc.Pipeline.from_text(f"layernorm{{mode={mode}}}").run(
            FxModel(model, model.example_inputs(size=16))
        )


@pytest.mark.parametrize("form", ["reduce", "conv", "auto"])
def test_channel_forms_agree(form):
    model = _ditn(3)
    x = model.example_inputs(size=16)
    result = _run(f"layernorm{{form={form}}}", OnnxModel(export_onnx(model, x)))
    record = result.report.records[-1]
    forms = record.stats["forms"]
    assert len(forms) == 6 and record.error["ok"]
    if form == "auto":  # timed: both forms measured at each site's shape
        assert all(
            {"reduce", "conv"} <= set(v) and v["form"] in ("reduce", "conv") for v in forms.values()
        )
    else:
        assert {v["form"] for v in forms.values()} == {form}
    with torch.no_grad():
        expected = model(**x).numpy()
    np.testing.assert_allclose(result.model.run({"x": x["x"].numpy()})[0], expected, atol=1e-4)
