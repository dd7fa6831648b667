"""remove-blocks on HF LLaMA models (FX): the chosen blocks go, the rest are renumbered so the
model equals a smaller model of the same class with those weights and still generates; cosine
finds a block that does nothing; random is seeded; errors are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import effc
from effc.errors import PassOptionError, UnsupportedError
from effc.ir import FxModel
from effc.passes._train import output_distance
from effc.passes.remove_blocks import remove

transformers = pytest.importorskip("transformers")


def _config(layers=4):
    return transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def _llama(idle: int | None = None):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config()).eval()
    for p in model.parameters():  # a trained model's scale: blocks change the hidden state
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else None
    if idle is not None:  # block `idle` adds (almost) nothing to the residual stream
        layer = model.model.layers[idle]
        with torch.no_grad():
            layer.self_attn.o_proj.weight.mul_(1e-4)
            layer.mlp.down_proj.weight.mul_(1e-4)
    return model


def _calib(n=2, seq=16):
    rng = np.random.default_rng(0)
    return [
        {
            "input_ids": rng.integers(0, 128, (1, seq)).astype(np.int64),
            "attention_mask": np.ones((1, seq), np.int64),
        }
        for _ in range(n)
    ]


def _smaller(model, keep):
    """A fresh 3-layer model holding the kept layers' weights: the reference."""
    small = transformers.LlamaForCausalLM(_config(len(keep))).eval()
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i not in keep:
                continue
            k = k.replace(f"model.layers.{i}.", f"model.layers.{keep.index(i)}.", 1)
        state[k] = v
    small.load_state_dict(state)
    return small


def test_cosine_removes_the_idle_block_and_the_model_equals_the_smaller_one():
    model = _llama(idle=2)
    original = _llama(idle=2)
    result = effc.Pipeline.from_text("remove-blocks{count=1}").run(
        model, effc.PassContext(calibration=_calib())
    )
    stats = result.report.records[0].stats
    assert stats["removed"] == [2] and stats["blocks_after"] == 3
    assert stats["scores"][2] == max(stats["scores"]) > 0.99
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    reference = _smaller(original, [0, 1, 3])
    ids = torch.tensor([[5, 9, 3, 7, 1]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    # generate() with its KV cache still works and agrees with the smaller model
    a = model.generate(ids, max_new_tokens=6, do_sample=False)
    b = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_compression_records_follow_their_blocks():
    model = _llama(idle=1)
    result = effc.Pipeline.from_text("quantize{bits=8,group=16},remove-blocks{count=1}").run(
        model, effc.PassContext(calibration=_calib())
    )
    sites = result.model.compression.sites
    assert result.report.records[-1].stats["removed"] == [1]
    assert not any(k.startswith("model.layers.3.") for k in sites)
    # old block 2 is block 1 now: its quantized weight is the module's weight
    w = model.model.layers[1].mlp.down_proj.weight.detach()
    torch.testing.assert_close(sites["model.layers.1.mlp.down_proj"].dequantized(), w)


def test_rate_and_random_are_seeded():
    picks = []
    for seed in (0, 0, 1):
        result = effc.Pipeline.from_text("remove-blocks{rate=0.5,score=random}").run(
            _llama(), effc.PassContext(seed=seed)
        )
        picks.append(result.report.records[0].stats["removed"])
    assert len(picks[0]) == 2 and picks[0] == picks[1]


def test_greedy_removes_one_block_at_a_time_by_its_measured_effect():
    """score=greedy: round 1 skips every block alone and takes the closest (the idle block);
    round 2 does so with it skipped; the reported distance of the last round is what the model
    with those blocks really removed measures (the skip hooks are removal)."""
    model, original = _llama(idle=2), _llama(idle=2)
    calib = _calib(3)
    result = effc.Pipeline.from_text("remove-blocks{count=2,score=greedy}").run(
        model, effc.PassContext(calibration=calib)
    )
    stats = result.report.records[0].stats
    rounds = stats["greedy"]
    assert rounds[0]["removed"] == 2 and stats["scores"][2] == min(stats["scores"])
    assert sorted(stats["removed"]) == sorted(r["removed"] for r in rounds)
    assert rounds[0]["distance"] <= rounds[1]["distance"]
    with torch.no_grad():
        d = [
            output_distance(model(**x), original(**x))
            for x in ({k: torch.from_numpy(v) for k, v in c.items()} for c in calib)
        ]
    assert float(sum(d) / len(d)) == pytest.approx(rounds[1]["distance"], rel=1e-4, abs=1e-7)
    # round 2 took the best second block: every other pair measures no closer
    keep = [i for i in range(4) if i not in stats["removed"]]
    for other in (i for i in range(4) if i != 2 and i != rounds[1]["removed"]):
        alt = _llama(idle=2)
        fx = FxModel(alt, {"input_ids": torch.from_numpy(calib[0]["input_ids"])})
        remove(fx, "model.layers", {2, other})
        with torch.no_grad():
            e = [
                output_distance(alt(**x), original(**x))
                for x in ({k: torch.from_numpy(v) for k, v in c.items()} for c in calib)
            ]
        assert float(sum(e) / len(e)) >= rounds[1]["distance"] * (1 - 1e-4), (other, keep)


@pytest.mark.parametrize(
    "text, error",
    [
        ("remove-blocks", PassOptionError),
        ("remove-blocks{count=1,rate=0.5}", PassOptionError),
        ("remove-blocks{count=4,score=random}", PassOptionError),
        ("remove-blocks{count=1,score=gates}", UnsupportedError),
        ("remove-blocks{count=1,score=greedy,samples=0}", PassOptionError),
    ],
)
def test_bad_requests_are_one_line_errors(text, error):
    with pytest.raises(error):
        effc.Pipeline.from_text(text).run(_llama(), effc.PassContext(calibration=_calib()))


@pytest.mark.parametrize("count", [1, 2])
def test_onnx_removal_finds_the_same_blocks_and_equals_fx(tmp_path, count):
    """On the ONNX export: the residual stream is found, cosine scores (from onnxruntime) match
    the FX ones, and the pruned graph computes what the FX-pruned model computes; nodes that
    later blocks share (the attention mask block 0 builds) survive."""
    from effc.ir.onnx_io import save_onnx
    from effc.pipeline import lower_to_onnx

    fx_model = effc.Pipeline.from_text("cleanup").run(_llama(idle=2)).model
    path = tmp_path / "m.onnx"
    save_onnx(lower_to_onnx(fx_model).model, path)
    text = f"remove-blocks{{count={count}}}"
    onnx_result = effc.Pipeline.from_text(text).run(
        str(path), effc.PassContext(calibration=_calib())
    )
    fx_result = effc.Pipeline.from_text(text).run(
        _llama(idle=2), effc.PassContext(calibration=_calib())
    )
    a, b = (r.report.records[0].stats for r in (onnx_result, fx_result))
    assert a["removed"] == b["removed"] and 2 in a["removed"]
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)
    x = _calib(1)[0]
    np.testing.assert_allclose(
        onnx_result.model.run(x)[0], fx_result.model.run(x)[0], rtol=1e-4, atol=1e-4
    )
    before = sum(1 for _ in effc.load(str(path)).model.graph)
    assert sum(1 for _ in onnx_result.model.model.graph) < before
    if count == 1:  # greedy skips blocks of the torch model: a one-line error on ONNX
        with pytest.raises(UnsupportedError, match="score=greedy .* FX only"):
            effc.Pipeline.from_text("remove-blocks{count=1,score=greedy}").run(
                str(path), effc.PassContext(calibration=_calib())
            )


def _bert_config():
    return transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )


def _bert():
    torch.manual_seed(0)
    model = transformers.BertModel(_bert_config()).eval()
    with torch.no_grad():  # non-zero biases, so keeping them per block is seen
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def test_bert_family_blocks_are_removed_and_shared():
    """An HF BERT (encoder.layer.N, BertLayer returning a tuple): removal gives the smaller
    model, sharing keeps LayerNorms and biases per block."""
    config = _bert_config()
    model = _bert()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = effc.Pipeline.from_text(
        "remove-blocks{count=1,score=random},share-blocks{group=3}"
    ).run(model, effc.PassContext(seed=1))
    (removed,) = result.report.records[0].stats["removed"]
    keep = [i for i in range(4) if i != removed]
    assert model.config.num_hidden_layers == 3 and len(model.encoder.layer) == 3
    layers = model.encoder.layer
    assert layers[0].attention.self.query.weight is layers[2].attention.self.query.weight
    assert layers[0].output.LayerNorm.weight is not layers[1].output.LayerNorm.weight
    assert layers[0].attention.self.query.bias is not layers[2].attention.self.query.bias
    small = transformers.BertModel(
        transformers.BertConfig(**{**config.to_dict(), "num_hidden_layers": 3})
    ).eval()
    state = {}
    for k, v in original.items():
        if k.startswith("encoder.layer."):
            i = int(k.split(".")[2])
            if i not in keep:
                continue
            k = k.replace(f"encoder.layer.{i}.", f"encoder.layer.{keep.index(i)}.", 1)
        state[k] = v
    small.load_state_dict(state)
    with torch.no_grad():  # what sharing the group of three with choose=first means
        for name, p in small.named_parameters():
            if name.startswith("encoder.layer.") and name.endswith("dense.weight") | (
                name.rpartition(".")[0].rsplit(".", 1)[-1] in ("query", "key", "value")
                and name.endswith(".weight")
            ):
                first = name.replace(f"encoder.layer.{name.split('.')[2]}.", "encoder.layer.0.", 1)
                p.copy_(dict(small.named_parameters())[first])
    ids = torch.tensor([[5, 9, 3, 7, 1, 2]])
    torch.testing.assert_close(
        model(input_ids=ids).last_hidden_state, small(input_ids=ids).last_hidden_state
    )


def test_bsr_layers_of_a_shared_weight_keep_their_blocks_biases():
    """After share-blocks and W4 on a BERT (a bias per block), swap_linears packs each shared
    weight once, and each block's layer adds its own bias: the BSR model computes what the
    dequantized shared model computes."""
    from effc.runtime.modules import BSRLinear, swap_linears

    model = _bert()
    result = effc.Pipeline.from_text("share-blocks{group=2},quantize{bits=4,group=16}").run(
        model, effc.PassContext()
    )
    x = {"input_ids": torch.randint(0, 128, (1, 12))}
    with torch.no_grad():
        want = model(**x).last_hidden_state
    records = swap_linears(model, result.model.compression, decide=False)
    assert sum("shared_by" in r for r in records) == 12  # 6 linears in each of the 2 pairs
    a, b = (model.encoder.layer[i].attention.self.query for i in (0, 1))
    assert isinstance(a, BSRLinear) and isinstance(b, BSRLinear)
    assert a.values.data_ptr() == b.values.data_ptr()  # one packed copy
    assert not torch.equal(a.bias, b.bias)  # each block's bias
    with torch.no_grad():
        got = model(**x).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bert_legacy_onnx_export_without_shapes_equals_fx(tmp_path):
    """A legacy (TorchScript) export writes no intermediate shapes; the residual stream is still
    found (shapes inferred first), and removal then sharing on the ONNX file computes what the
    same pipeline computes on the torch model."""
    from effc.ir.onnx_io import save_onnx
    from effc.ir.torch_io import export_onnx

    ids = torch.tensor([[5, 9, 3, 7, 1, 2, 8, 4]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    path = tmp_path / "bert.onnx"
    save_onnx(export_onnx(_bert(), inputs, legacy=True, opset=14), path)
    graph = effc.load(str(path)).model.graph
    assert any(v.shape is None for node in graph for v in node.outputs)  # the case under test
    calib = [{k: v.numpy() for k, v in inputs.items()}]
    text = "remove-blocks{count=1,score=cosine},share-blocks{group=2}"
    onnx_result = effc.Pipeline.from_text(text).run(str(path), effc.PassContext(calibration=calib))
    fx_result = effc.Pipeline.from_text(text).run(_bert(), effc.PassContext(calibration=calib))
    a, b = (r.report.records[0].stats for r in (onnx_result, fx_result))
    assert a["removed"] == b["removed"]
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)
    feeds = calib[0]
    np.testing.assert_allclose(
        onnx_result.model.run(feeds)[0], fx_result.model.run(feeds)[0], rtol=1e-4, atol=1e-4
    )
