"""quantize-activations: calibration methods, Q/DQ placement, error under onnxruntime."""

import numpy as np
import pytest
import torch

import effc
from effc.errors import InputError
from effc.ir.model import FxModel, OnnxModel
from effc.ir.torch_io import export_onnx
from effc.passes.quantize_activations import BINS, _Range, kl_threshold


def _observed(x: np.ndarray) -> _Range:
    r = _Range()
    r.observe_max(x)
    r.observe_hist(x)
    return r


def test_thresholds_clip_outliers_except_minmax():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [40.0, -35.0]]).astype(np.float32)
    r = _observed(x)
    assert r.threshold("minmax", 99.99) == pytest.approx(40.0)
    pct = r.threshold("percentile", 99.99)
    assert 3.0 < pct < 5.0  # |N(0,1)| at 99.99% is 3.9
    ent = r.threshold("entropy", 99.99)
    assert 2.0 < ent < 20.0 and ent < r.amax


def test_kl_threshold_keeps_a_uniform_distribution_whole():
    hist = np.full(BINS, 100)
    edges = np.linspace(0, 1, BINS + 1)[1:]
    assert kl_threshold(hist, edges) == pytest.approx(1.0, abs=0.01)


def _ditn_onnx(size: int = 16):
    from effc.models.ditn import load_trained

    model = load_trained()
    return model, OnnxModel(export_onnx(model, model.example_inputs(size=size)))


def _calib(n=4, size=16):
    g = torch.Generator().manual_seed(3)
    return [{"x": torch.rand(1, 3, size, size, generator=g).numpy()} for _ in range(n)]


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_every_conv_reads_int8_activations_and_weights(method):
    _, model = _ditn_onnx()
    convs = sum(n.op_type == "Conv" for n in model.model.graph)
    result = effc.Pipeline.from_text(f"quantize-activations{{method={method}}}").run(
        model, effc.PassContext(calibration=_calib())
    )
    graph = result.model.model.graph
    for node in graph:
        if node.op_type == "Conv":
            assert node.inputs[0].producer().op_type == "DequantizeLinear"
            assert node.inputs[1].producer().op_type == "DequantizeLinear"
            q = node.inputs[0].producer().inputs[0].producer()
            assert q.op_type == "QuantizeLinear"
    record = result.report.records[0]
    assert record.stats["sites"] == convs
    quantize = sum(n.op_type == "QuantizeLinear" for n in graph)
    assert quantize == record.stats["activations"] <= convs  # one pair per activation value
    int8 = [v for v in graph.initializers.values() if v.dtype.name == "INT8"]
    assert len(int8) >= convs
    assert 0 < record.error["max_abs"] < 0.25  # measured on calibration inputs, in [0, 1] pixels


def test_w8a8_psnr_stays_close_to_fp32():
    from tools.quality.sr import downscale, eval_pairs, load_image, psnr

    pytest.importorskip("skimage")
    model, onnx_model = _ditn_onnx(64)
    pairs = eval_pairs(2)
    lr, hr = pairs["chelsea"][0][..., 64:128, 64:128], pairs["chelsea"][1][..., 128:256, 128:256]
    fp32 = psnr(torch.from_numpy(onnx_model.run({"x": lr.numpy()})[0]), hr, 2)
    train = downscale(load_image("coffee")[None], 2)  # a training image, never an evaluation one
    calib = [{"x": train[..., i : i + 64, i : i + 64].numpy()} for i in (0, 64, 128)]

    effc.Pipeline.from_text("quantize-activations").run(
        onnx_model, effc.PassContext(calibration=calib)
    )

    int8 = psnr(torch.from_numpy(onnx_model.run({"x": lr.numpy()})[0]), hr, 2)
    assert fp32 - 1.5 < int8 < fp32 + 0.5, (fp32, int8)


def test_fx_input_is_lowered_and_calibration_is_required():
    model, _ = _ditn_onnx()
    fx = FxModel(model, model.example_inputs(size=16))
    with pytest.raises(InputError, match="calibration"):
        effc.Pipeline.from_text("quantize-activations").run(fx)
    result = effc.Pipeline.from_text("quantize-activations{method=minmax}").run(
        FxModel(model, model.example_inputs(size=16)), effc.PassContext(calibration=_calib(2))
    )
    assert result.model.kind == "onnx"
