"""--target tensorrt: the TensorRT-ready ONNX is checked for its properties and run under
onnxruntime against the source model; the engine build is real code, exercised only where
TensorRT and an NVIDIA GPU exist (marker ``tensorrt``)."""

import importlib.util

import numpy as np
import onnx_ir as ir
import pytest
import torch

import effc
from effc.backends import tensorrt
from effc.compile import compile_model
from effc.errors import UnsupportedError
from effc.ir.model import FxModel, OnnxModel
from effc.passes.tensorrt_legalize import TRT_OPS


def _compile(model, passes: str, out, calib=None, shapes=None):
    return compile_model(
        model,
        passes,
        out,
        target="tensorrt",
        ctx=effc.PassContext(calibration=calib or [], shapes=shapes or {}),
    )


def _load(out) -> ir.Model:
    return ir.load(str(out / "model.onnx"))


def test_ditn_lowers_to_static_opset18_onnx_that_matches_the_source(tmp_path):
    from effc.backends import get_backend
    from effc.models.ditn import load_trained

    model = load_trained()
    x = model.example_inputs(size=16)
    result = _compile(FxModel(model, x), "cleanup", tmp_path / "out")
    names = [r.name for r in result.report.records]
    assert "layernorm" in names and names[-1] == "tensorrt-legalize"  # shown in the report
    legal = next(r for r in result.report.records if r.name == "tensorrt-legalize")
    assert legal.stats["warnings"] == [] and legal.stats["dynamic_dims"] == []
    onnx = _load(tmp_path / "out")
    assert onnx.opset_imports[""] >= 18
    ops = {n.op_type for n in onnx.graph}
    assert ops <= TRT_OPS and "LayerNormalization" not in ops
    # left: the one unfold and one fold, and k^T in each of the 2 ITLs' attention
    assert sum(n.op_type == "Transpose" for n in onnx.graph) == 4

    assert all(isinstance(d, int) for v in onnx.graph.inputs for d in v.shape)
    got = get_backend("tensorrt").run(tmp_path / "out", {"x": x["x"].numpy()})
    with torch.no_grad():
        expected = model(**x).numpy()
    np.testing.assert_allclose(next(iter(got.values())), expected, rtol=1e-4, atol=1e-4)


def test_int4_weights_become_block_dequantize_linear(tmp_path, tiny_llama):
    from effc.ir.torch_io import export_onnx

    x = tiny_llama.example_inputs()
    model = OnnxModel(export_onnx(tiny_llama, x))
    result = _compile(model, "quantize{bits=4,group=16}", tmp_path / "out")
    onnx = _load(tmp_path / "out")
    assert onnx.opset_imports[""] >= 21
    dqs = [n for n in onnx.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 15
    for dq in dqs:
        assert dq.attributes["block_size"].value == 16
        assert dq.inputs[0].const_value.dtype == ir.DataType.UINT4
        assert dq.inputs[2].const_value.dtype == ir.DataType.UINT4
    # the 4-bit file is smaller than the fp32 weights it replaces
    fp32_bytes = sum(
        v.const_value.nbytes for v in onnx.graph.initializers.values() if v.dtype.name == "FLOAT"
    )
    assert fp32_bytes < 0.5 * 4 * sum(p.numel() for p in tiny_llama.parameters())
    got = tensorrt.run(tmp_path / "out", {k: v.numpy() for k, v in x.items()})
    ref = result.model  # the legalized model: compare with the fake-quantized weights' outputs
    fake = effc.Pipeline.from_text("quantize{bits=4,group=16}").run(
        OnnxModel(export_onnx(tiny_llama, x))
    )
    expected = fake.model.run({k: v.numpy() for k, v in x.items()})[0]
    np.testing.assert_allclose(next(iter(got.values())), expected, rtol=1e-4, atol=1e-4)
    assert ref.kind == "onnx"


def test_w8a8_qdq_placement(tmp_path):
    from effc.models.ditn import load_trained

    model = load_trained()
    x = model.example_inputs(size=16)
    calib = [{"x": torch.rand(1, 3, 16, 16).numpy()} for _ in range(2)]
    _compile(FxModel(model, x), "quantize-activations{method=minmax}", tmp_path / "o", calib)
    onnx = _load(tmp_path / "o")
    convs = [n for n in onnx.graph if n.op_type == "Conv"]
    assert convs and all(c.inputs[0].producer().op_type == "DequantizeLinear" for c in convs)
    assert all(c.inputs[1].producer().op_type == "DequantizeLinear" for c in convs)


def test_ops_outside_the_tensorrt_table_are_warnings():
    from _helpers import from_text

    model = from_text(
        """<ir_version: 8, opset_import: ["" : 18]>
        g (float[2,3,3] x) => (float[2] y) { y = Det(x) }"""
    )
    result = effc.Pipeline.from_text("tensorrt-legalize").run(model)
    assert result.report.records[0].stats["warnings"] == [
        "op Det is not in the TensorRT 10 op table"
    ]


def test_symbolic_dims_are_fixed_by_shapes_or_reported():
    from _helpers import from_text

    text = """<ir_version: 8, opset_import: ["" : 18]>
        g (float[N,4] x) => (float[N,4] y) { y = Relu(x) }"""
    result = effc.Pipeline.from_text("tensorrt-legalize").run(from_text(text))
    assert result.report.records[0].stats["dynamic_dims"] == ["x[0]=N"]
    result = effc.Pipeline.from_text("tensorrt-legalize").run(
        from_text(text), effc.PassContext(shapes={"x": [3, 4]})
    )
    assert result.report.records[0].stats["dynamic_dims"] == []
    assert list(result.model.model.graph.inputs[0].shape) == [3, 4]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
def test_engine_build_without_tensorrt_is_a_one_line_error(tmp_path, cli):
    with pytest.raises(UnsupportedError, match="tensorrt package"):
        tensorrt.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")
    code, _, err = cli(
        "compile",
        "builtin:ditn",
        "--passes",
        "cleanup",
        "-o",
        tmp_path / "out",
        "--target",
        "tensorrt",
        "--engine",
        "fp16",
    )
    assert code == 2 and "tensorrt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing partly written
    code, _, err = cli(
        "compile", "builtin:ditn", "--passes", "cleanup", "-o", tmp_path / "o2", "--engine", "fp16"
    )
    assert code == 2 and "--target tensorrt" in err


@pytest.mark.tensorrt
def test_engine_builds_and_matches_onnxruntime(tmp_path):
    from effc.models.ditn import load_trained

    model = load_trained()
    x = model.example_inputs(size=32)
    compile_model(
        FxModel(model, x),
        "cleanup",
        tmp_path / "out",
        target="tensorrt",
        backend_options={"engine": "fp32"},
    )
    got = tensorrt.run(tmp_path / "out", {"x": x["x"].numpy()})
    with torch.no_grad():
        expected = model(**x).numpy()
    np.testing.assert_allclose(next(iter(got.values())), expected, rtol=1e-3, atol=1e-3)
