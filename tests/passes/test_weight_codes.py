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


def _tied_llama():
    transformers = pytest.importorskip("transformers")
    import torch

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("embeddings", ["fp32", "tied", "int8", "int4"])
def test_embedding_tables_are_stored_as_codes_and_tied_ones_once(tmp_path, embeddings):
    """quantize{embeddings=...} on a tied HF LLaMA: fp32 leaves the table alone (lm_head untied);
    tied quantizes the shared weight once and the lookup reads the lm_head's MatMulNBits codes
    (GatherBlockQuantized through Reshapes: one copy in the file); int8/int4 quantize the table
    by rows. The artifact computes the fake-quantized model (fp32 rounding aside)."""
    import onnx

    model = _tied_llama()
    fake = effc.Pipeline.from_text(f"quantize{{bits=4,group=16,embeddings={embeddings}}}").run(
        model
    )
    x = [random_inputs(fake.model.input_specs(), s, vocab=256) for s in range(2)]
    expected = fake.model.run_all(x)
    result = compile_model(fake.model, "cleanup", tmp_path / "o")
    codes = result.report.records[-1]
    ops = result.model.op_histogram()
    lookups = ops.get("com.microsoft::GatherBlockQuantized", 0)
    assert lookups == (0 if embeddings == "fp32" else 1), ops
    if embeddings in ("tied", "int4"):  # int4 g16 codes of the table equal the lm_head's
        assert codes.stats["tied_to"] == ["lm_head"]
    got = result.model.run_all(x)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b[0], a[0], rtol=1e-4, atol=1e-4)
    stored = onnx.load(str(tmp_path / "o" / "model.onnx"))
    float_bytes = sum(
        t.dims[0] * t.dims[1] * 4
        for t in stored.graph.initializer
        if t.data_type == 1 and len(t.dims) == 2
    )
    table = 256 * 64 * 4
    if embeddings == "fp32":
        assert float_bytes >= table
    else:
        assert float_bytes < table  # no fp32 table left (scales only)
    if embeddings == "tied":
        names = [i.name for i in stored.graph.initializer]
        assert not any("gbq_data" in n for n in names)  # the lookup reads the lm_head's codes
    if embeddings != "fp32":
        assert fake.report.records[0].stats.get("embeddings") or embeddings == "tied"


def test_embedding_quantization_error_is_reported_and_the_tables_train_nowhere():
    model = _tied_llama()
    result = effc.Pipeline.from_text("quantize{bits=4,group=16,embeddings=int8}").run(model)
    (table,) = result.report.records[0].stats["embeddings"]
    assert table["table"] == "model.embed_tokens" and 0 < table["weight_rel_error"] < 0.01
    state = result.model.compression.sites["model.embed_tokens"]
    assert state.bits == 8 and state.codes.shape == (256, 4, 16)
    emb = model.model.embed_tokens.weight.detach()
    assert torch_equal(emb, state.dequantized())


def torch_equal(a, b):
    import torch

    return bool(torch.equal(a.float(), b.float()))
