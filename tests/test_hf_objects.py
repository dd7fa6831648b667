"""HF model objects a user holds, passed to Pipeline.run as they are (no wrapper, no --shape):
inputs come from the config, caches are off while effc traces and runs, and the caller's module
comes back compressed in place and ready for generate()."""

from __future__ import annotations

import pytest
import torch

import effc

transformers = pytest.importorskip("transformers")


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _bert():
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_causal_lm_object_is_compressed_in_place_and_still_generates():
    model = _llama()
    prompt = torch.tensor([[1, 5, 9, 3]])
    before = model.generate(prompt, max_new_tokens=4, do_sample=False)
    result = effc.Pipeline.from_text("quantize{bits=8,group=16}").run(model)
    assert result.model.module is model and model.config.use_cache is True
    state = result.model.compression.sites["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(
        model.model.layers[0].mlp.down_proj.weight.detach(), state.dequantized()
    )
    after = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert after.shape == before.shape


def test_causal_lm_object_lowers_to_onnx():
    result = effc.Pipeline.from_text("quantize{bits=4,group=16},tensorrt-legalize").run(_llama())
    assert result.model.kind == "onnx"
    names = [s.name for s in result.model.input_specs()]
    assert names == ["input_ids", "attention_mask"]


def test_encoder_object_runs_verified():
    model = _bert()
    result = effc.Pipeline.from_text(
        "quantize{bits=8,group=16}", instruments=[effc.VerifyInstrument()]
    ).run(model)
    assert result.report.records[-1].error is not None
    assert len(result.model.compression.quantized()) == 2 * 6 + 1  # 6 per layer, the pooler
