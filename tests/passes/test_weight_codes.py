"""weight-codes: the onnxruntime target stores quantized weights as codes (MatMulNBits,
DequantizeLinear blocks), computes the fake-quantized model, and the artifact is smaller."""

from __future__ import annotations

import numpy as np
import pytest

import effc
from effc.compile import compile_model
from effc.inputs import random_inputs
from effc.models import BUILTINS


@pytest.mark.parametrize(
    "quant, nbits, dq",
    [("bits=4,group=16", 15, 0), ("bits=8,group=32", 15, 0), ("bits=3,group=16", 0, 15)],
)
def test_codes_compute_the_fake_quantized_model_in_less_space(tmp_path, quant, nbits, dq):
    model = BUILTINS["tiny-llama"][0]()
    group = quant.split("group=")[1]
    fake = effc.Pipeline.from_text(
        f"group-prune{{score=magnitude,group={group}}},quantize{{{quant}}}"
    ).run(model)
    weight_matmuls = 15
    x = [random_inputs(fake.model.input_specs(), s, vocab=256) for s in range(2)]
    expected = fake.model.run_all(x)
    result = compile_model(fake.model, "cleanup", tmp_path / "o")  # target onnxruntime
    codes = result.report.records[-1]
    assert codes.name == "weight-codes"
    assert codes.stats == {"matmul_nbits": nbits, "dequantize_linear": dq}
    assert codes.error["ok"]
    ops = result.model.op_histogram()
    assert ops.get("com.microsoft::MatMulNBits", 0) == nbits
    assert ops.get("DequantizeLinear", 0) == dq
    before_ops = codes.ops_before
    assert ops.get("MatMul", 0) == before_ops["MatMul"] - (weight_matmuls if nbits else 0)
    got = result.model.run_all(x)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b[0], a[0], rtol=1e-4, atol=1e-4)
    before, after = codes.bytes_before, codes.bytes_after
    assert after < before * 0.6, (before, after)  # the fp32 embedding stays
    assert (tmp_path / "o" / "model.onnx").stat().st_size < before


def test_accuracy_level_4_is_lossy_and_reported():
    model = BUILTINS["tiny-llama"][0]()
    result = effc.Pipeline.from_text(
        "quantize{bits=4,group=16},weight-codes{accuracy_level=4}",
        instruments=[effc.VerifyInstrument()],
    ).run(model)
    record = result.report.records[-1]
    assert record.lossy and record.error["max_abs"] > 0
