"""effc's decode loop (static KV cache) against full forward passes and HF generate()."""

import numpy as np
import pytest
import torch

import effc
from effc.errors import UnsupportedError
from effc.runtime.decode import StaticDecoder
from effc.runtime.modules import BSRLinear, swap_linears


def _model(seed: int = 0):
    from effc.models import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig()).eval()
    with torch.no_grad():  # larger weights than the init, so greedy tokens vary
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _greedy_by_full_forward(model, prompt: torch.Tensor, n: int) -> list[int]:
    ids, out = prompt.clone(), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(ids[None])[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor(out[-1:])])
    return out


def test_static_cache_decoding_equals_full_forward_greedy():
    model = _model()
    prompt = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(1))
    result = StaticDecoder(model, max_len=64).generate(prompt, 20)
    expected = _greedy_by_full_forward(model, prompt, 20)
    assert result.tokens == expected
    assert len(set(expected)) > 3  # the check is not vacuous
    assert len(result.step_s) == 19 and result.tokens_per_s > 0


def test_chunked_prefill_and_single_steps_give_the_full_forward_logits():
    model = _model(2)
    ids = torch.randint(0, 256, (15,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids[None])[0]
    decoder = StaticDecoder(model, max_len=32)
    for start, stop in ((0, 10), (10, 11), (11, 15)):  # a prefill, one step, a chunk at pos > 0
        logits = decoder.forward(ids[start:stop], start)
        torch.testing.assert_close(logits, full[stop - 1], rtol=1e-4, atol=1e-5)


def test_matches_hf_generate_on_an_hf_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    prompt = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hf = model.generate(prompt[None], max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ours = StaticDecoder(model, max_len=64).generate(prompt, 16)
    assert ours.tokens == hf[0, 9:].tolist()


def test_bsr_model_decodes_the_same_tokens_as_its_dequantized_weights():
    model = _model(7)
    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, 256, (1, 16)).astype(np.int64)} for _ in range(2)]
    result = effc.Pipeline.from_text("group-prune{sparsity=0.5},quantize{bits=4,group=16}").run(
        model, effc.PassContext(calibration=calib)
    )
    prompt = torch.arange(5)
    dense = StaticDecoder(model, 40).generate(prompt, 24).tokens
    swap_linears(model, result.model.annotations, decide=False)
    assert isinstance(model.lm_head, BSRLinear)
    assert len(set(dense)) > 3
    assert StaticDecoder(model, 40).generate(prompt, 24).tokens == dense


def test_clear_errors():
    with pytest.raises(UnsupportedError, match="LLaMA-style"):
        StaticDecoder(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedError, match="exceed the cache"):
        StaticDecoder(_model(), max_len=8).generate(torch.arange(5), 4)
