"""effc's decode loop (static KV cache) against full forward passes and HF generate()."""

import numpy as np
import pytest
import torch

import effc
from effc.errors import UnsupportedError
from effc.runtime import decode
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


@pytest.mark.parametrize("fused", [True, False])
def test_static_cache_decoding_equals_full_forward_greedy(fused):
    model = _model()
    prompt = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(1))
    decoder = StaticDecoder(model, max_len=64, fused=fused)
    assert decoder.fused == fused
    result = decoder.generate(prompt, 20)
    expected = _greedy_by_full_forward(model, prompt, 20)
    assert result.tokens == expected
    assert len(set(expected)) > 3  # the check is not vacuous
    assert len(result.step_s) == 19 and result.tokens_per_s > 0


@pytest.mark.parametrize("fused", [True, False])
def test_chunked_prefill_and_single_steps_give_the_full_forward_logits(fused):
    model = _model(2)
    ids = torch.randint(0, 256, (15,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids[None])[0]
    decoder = StaticDecoder(model, max_len=32, fused=fused)
    for start, stop in ((0, 10), (10, 11), (11, 15)):  # a prefill, one step, a chunk at pos > 0
        logits = decoder.forward(ids[start:stop], start)
        torch.testing.assert_close(logits, full[stop - 1], rtol=1e-4, atol=1e-5)


def _hf_llama(**config):
    """A small HF LlamaForCausalLM (2 layers, 4 heads over 2 kv heads, head dim 16) with weights
    drawn larger than its init, so greedy tokens vary; ``config`` adds or overrides settings."""
    transformers = pytest.importorskip("transformers")
    settings = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings, **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("fused", [True, False])
def test_matches_hf_generate_on_an_hf_llama(fused):
    model = _hf_llama(
        vocab_size=300, max_position_embeddings=128, rope_theta=5000.0, tie_word_embeddings=True
    )
    prompt = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hf = model.generate(prompt[None], max_new_tokens=16, min_new_tokens=16, do_sample=False)
    decoder = StaticDecoder(model, max_len=64, fused=fused)
    assert decoder.fused == fused  # HF's SiLUActivation, LlamaRMSNorm and head dim 16 all fuse
    assert decoder.generate(prompt, 16).tokens == hf[0, 9:].tolist()


def _w4s50(seed: int = 7):
    """The tiny LLaMA at W4S50 (fake-quantized weights) and the pipeline's result."""
    model = _model(seed)
    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, 256, (1, 16)).astype(np.int64)} for _ in range(2)]
    result = effc.Pipeline.from_text("group-prune{sparsity=0.5},quantize{bits=4,group=16}").run(
        model, effc.PassContext(calibration=calib)
    )
    return model, result


def test_bsr_model_decodes_the_same_tokens_as_its_dequantized_weights():
    model, result = _w4s50()
    prompt = torch.arange(5)
    dense = StaticDecoder(model, 40).generate(prompt, 24).tokens
    swap_linears(model, result.model.compression, decide=False)
    assert isinstance(model.lm_head, BSRLinear)
    assert len(set(dense)) > 3
    assert StaticDecoder(model, 40).generate(prompt, 24).tokens == dense


def test_clear_errors():
    with pytest.raises(UnsupportedError, match="LLaMA-style"):
        StaticDecoder(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedError, match="exceed the cache"):
        StaticDecoder(_model(), max_len=8).generate(torch.arange(5), 4)
    for fused in (True, False):
        with pytest.raises(UnsupportedError, match="empty prompt"):
            StaticDecoder(_model(), max_len=8, fused=fused).generate(torch.arange(0), 2)
    with pytest.raises(UnsupportedError, match="exceed the cache"):
        StaticDecoder(_model(), max_len=8, fused=True).forward(torch.arange(3), 6)


# the compiled decode ops against the torch expressions they replace


@pytest.fixture(scope="module")
def ops():
    from effc.runtime.cpu import kernels

    return kernels()


def test_norm_and_silu_ops_match_torch(ops):
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(3, 576, generator=g) * 4, torch.randn(3, 576, generator=g)
    w = torch.randn(576, generator=g)

    def ref(v):
        return v * torch.rsqrt(v.square().mean(-1, keepdim=True) + 1e-5) * w

    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), ref(x), rtol=1e-5, atol=1e-6)
    stream = x.clone()
    h = ops.add_rms_norm(stream, delta, w, 1e-5)
    assert torch.equal(stream, x + delta)  # the residual add happens in place
    torch.testing.assert_close(h, ref(x + delta), rtol=1e-5, atol=1e-6)
    gu = torch.randn(2, 2 * 1536, generator=g) * 6
    expected = torch.nn.functional.silu(gu[:, :1536]) * gu[:, 1536:]
    torch.testing.assert_close(ops.silu_mul(gu), expected, rtol=1e-5, atol=1e-6)
    gu[0, 3], gu[1, 1536 + 5] = float("nan"), float("inf")  # NaN and inf propagate as in torch
    expected = torch.nn.functional.silu(gu[:, :1536]) * gu[:, 1536:]
    torch.testing.assert_close(ops.silu_mul(gu), expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(x, torch.ones(575), 1e-5)
    with pytest.raises(RuntimeError, match="2F"):
        ops.silu_mul(torch.ones(2, 7))


@pytest.mark.parametrize(
    "heads,kv,head_dim,pos,tokens",
    [
        (9, 3, 64, 0, 1),
        (9, 3, 64, 37, 1),
        (4, 4, 16, 63, 1),
        (8, 2, 32, 300, 1),
        (9, 3, 64, 0, 7),  # a prefill
        (4, 2, 16, 10, 5),  # a chunk after earlier tokens
    ],
)
def test_attend_matches_the_torch_attention(ops, heads, kv, head_dim, pos, tokens):
    """Tokens at pos.. over a cache filled before them: the compiled op (rotary, cache write,
    causal softmax) against the decoder's torch-op attention on a copy of the caches."""
    import types

    cfg = types.SimpleNamespace(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        rope_theta=10000.0,
    )
    model = types.SimpleNamespace(model=types.SimpleNamespace(layers=[0]), lm_head=0, config=cfg)
    ref = StaticDecoder(model, max_len=pos + tokens + 1, fused=False)
    g = torch.Generator().manual_seed(pos)
    ref.k_cache.normal_(generator=g)
    ref.v_cache.normal_(generator=g)
    k_cache, v_cache = ref.k_cache[0].clone(), ref.v_cache[0].clone()
    qkv = torch.randn(tokens, (heads + 2 * kv) * head_dim, generator=g) * 3
    q, k, v = qkv.split([heads * head_dim, kv * head_dim, kv * head_dim], -1)
    expected = ref._attention(0, q, k, v, pos)
    got = ops.attend(qkv, ref.cos, ref.sin, k_cache, v_cache, pos, heads, ref.scale)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k_cache, ref.k_cache[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, ref.v_cache[0])
    poison = qkv.clone()
    poison[-1, heads * head_dim] = float("nan")  # a NaN key poisons its kv group's heads
    got = ops.attend(poison, ref.cos, ref.sin, k_cache, v_cache, pos, heads, ref.scale)
    poisoned = got[-1].view(heads, head_dim).isnan().all(-1)
    assert poisoned.tolist() == [h < heads // kv for h in range(heads)]
    if tokens > 1:  # earlier tokens do not see the last one's key (causal)
        assert not got[:-1].isnan().any()
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.attend(qkv, ref.cos, ref.sin, k_cache, v_cache, pos + 2, heads, ref.scale)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        ops.attend(qkv, ref.cos, ref.sin, k_cache, v_cache, 0, heads + 1, ref.scale)


def _compressed(seed: int = 7, **swap):
    model, result = _w4s50(seed)
    swap_linears(model, result.model.compression, decide=False, **swap)
    return model


@pytest.mark.parametrize("case", ["bsr", "bsr int8 x", "mixed"])
def test_fused_loop_gives_the_reference_logits_on_bsr_models(case):
    """Stacked BSR q/k/v and gate/up (and a layer where one projection stayed dense, which runs
    its projections separately) against the torch-op loop's logits at every step."""
    model = _compressed(**({"activations": "int8"} if case == "bsr int8 x" else {}))
    if case == "mixed":
        attn = model.model.layers[1].self_attn
        attn.k_proj = torch.nn.Linear(attn.k_proj.in_features, attn.k_proj.out_features, bias=False)
        attn.k_proj.weight.data.normal_(0, 0.3)
    fused, ref = StaticDecoder(model, 40, fused=True), StaticDecoder(model, 40, fused=False)
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(5))
    for start, stop in ((0, 6),) + tuple((i, i + 1) for i in range(6, 12)):
        got, want = fused.forward(ids[start:stop], start), ref.forward(ids[start:stop], start)
        if case == "bsr int8 x":
            # int8 x rounds every activation to a grid: where the fused ops' last-ulp differences
            # put one on the other side of a rounding boundary, the logits move by about 2e-3
            # relative (seen on Zen 4 with VNNI, one step of seven); a wrongly stacked or routed
            # projection moves them by order 1
            assert float((got - want).norm() / want.norm()) < 1e-2, (start, stop)
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fused_loop_falls_back_or_names_what_it_lacks():
    model = _model(3)
    model.model.norm = torch.nn.LayerNorm(model.model.norm.weight.numel())
    with pytest.raises(UnsupportedError, match="RMSNorm final norm"):
        StaticDecoder(model, 32, fused=True)
    decoder = StaticDecoder(model, 32)  # default: the torch-op loop where fusing cannot run
    assert not decoder.fused
    prompt = torch.arange(4)
    assert decoder.generate(prompt, 6).tokens == _greedy_by_full_forward(model, prompt, 6)
    model = _model(3)
    model.model.layers[1].mlp.down_proj.to(torch.bfloat16)
    with pytest.raises(UnsupportedError, match="float32 weights, not torch.bfloat16"):
        StaticDecoder(model, 32, fused=True)
    assert not StaticDecoder(model, 32).fused


@pytest.mark.parametrize("kind", ["dense", "bsr"])
def test_plan_carries_biases(kind):
    """An HF LLaMA with q/k/v/o and MLP biases: the stacked biases (dense and BSR) against the
    torch-op loop."""
    model = _hf_llama(vocab_size=200, attention_bias=True, mlp_bias=True)
    if kind == "bsr":
        from effc.runtime.format import from_quantized

        for name, linear in list(model.named_modules()):
            if isinstance(linear, torch.nn.Linear) and "layers" in name:
                out, inp = linear.weight.shape
                g = torch.Generator().manual_seed(out + inp)
                matrix = from_quantized(
                    torch.randint(0, 16, (out, inp // 16, 16), dtype=torch.uint8, generator=g),
                    torch.rand(out, inp // 16, generator=g) * 0.05,
                    torch.randint(0, 16, (out, inp // 16), dtype=torch.uint8, generator=g),
                    torch.rand(out, inp // 16, generator=g) < 0.5,
                    4,
                )
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, BSRLinear(matrix, linear.bias))
    fused, ref = StaticDecoder(model, 24, fused=True), StaticDecoder(model, 24, fused=False)
    ids = torch.randint(0, 200, (9,), generator=torch.Generator().manual_seed(2))
    for start, stop in ((0, 5), (5, 6), (6, 9)):
        torch.testing.assert_close(
            fused.forward(ids[start:stop], start),
            ref.forward(ids[start:stop], start),
            rtol=1e-4,
            atol=1e-4,
        )


def test_shared_blocks_keep_one_copy_and_decode_the_dequantized_tokens(monkeypatch):
    """share-blocks, then W4S50: the blocks of a group get one BSRLinear per shared weight (one
    packed copy in memory, one stacked copy in the fused plan), and decoding gives the tokens of
    the dequantized shared model."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    calib = [
        {"input_ids": torch.randint(0, 256, (1, 16)).numpy(), "attention_mask": np.ones((1, 16))}
        for _ in range(2)
    ]
    for c in calib:
        c["attention_mask"] = c["attention_mask"].astype(np.int64)
    result = effc.Pipeline.from_text(
        "share-blocks{group=2},group-prune{sparsity=0.5,score=magnitude},quantize{bits=4,group=16}"
    ).run(model, effc.PassContext(calibration=calib))
    prompt = torch.arange(5)
    stacks = []
    real = decode.stacked_specs
    monkeypatch.setattr(decode, "stacked_specs", lambda m: stacks.append(m) or real(m))
    decoder = StaticDecoder(model, 40)
    dense = decoder.generate(prompt, 16).tokens
    if decoder.fused:  # the dense shared weights are stacked once per pair too
        assert len(stacks) == 2 * 2, "q/k/v and gate/up, once per pair of blocks"
    records = swap_linears(model, result.model.compression, decide=False)
    layers = model.model.layers
    assert isinstance(layers[0].mlp.up_proj, BSRLinear)
    assert layers[0].mlp.up_proj is layers[1].mlp.up_proj
    assert layers[0].mlp.up_proj is not layers[2].mlp.up_proj
    shared = [r for r in records if "shared_by" in r]
    assert len(shared) == 14  # 7 weights in each of the two pairs
    decoder = StaticDecoder(model, 40)
    assert decoder.generate(prompt, 16).tokens == dense
