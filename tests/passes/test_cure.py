"""cure after remove-blocks / share-blocks on an HF LLaMA (FX): it distills from the model as
it was before them (kept only when a cure follows), lowers its distillation loss, keeps sharing
intact (full and LoRA), leaves embeddings alone and refuses to run without a teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_remove_blocks import _calib, _llama

import effc
from effc.errors import UnsupportedError


def _kl(model, teacher, data):
    total = 0.0
    with torch.no_grad():
        for x in data:
            x = {k: torch.from_numpy(v) for k, v in x.items()}
            s = model(**x).logits.log_softmax(-1)
            t = teacher(**x).logits.log_softmax(-1)
            total += float((t.exp() * (t - s)).sum(-1).mean())
    return total / len(data)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_cure_lowers_the_gap_to_the_original_and_keeps_sharing(lora_rank):
    original = _llama()
    model = _llama()
    data = _calib(4)
    embed = model.model.embed_tokens.weight.detach().clone()
    result = effc.Pipeline.from_text(
        "remove-blocks{count=1,score=random},share-blocks{group=2},"
        f"cure{{steps=30,lr=0.003,lora_rank={lora_rank}}}"
    ).run(model, effc.PassContext(calibration=data))
    assert result.model.teacher is not None
    stats = result.report.records[-1].stats
    assert stats["logits_loss_last"] < stats["logits_loss_first"]
    assert stats["tail_loss_last"] < stats["tail_loss_first"]
    assert stats["steps"] == 30 and stats["trained_parameters"] > 0
    layers = model.model.layers
    assert layers[0].mlp.up_proj.weight is layers[1].mlp.up_proj.weight  # still shared
    assert isinstance(layers[0].mlp.up_proj, torch.nn.Linear)  # adapters merged, swapped out
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert all(p.requires_grad for p in model.parameters())  # as the caller had them
    # against an uncured copy of the same compression: closer to the original
    uncured = _llama()
    effc.Pipeline.from_text("remove-blocks{count=1,score=random},share-blocks{group=2}").run(
        uncured, effc.PassContext(calibration=data)
    )
    held_out = [
        {
            "input_ids": np.random.default_rng(9).integers(0, 128, (1, 12)),
            "attention_mask": np.ones((1, 12), np.int64),
        }
    ]
    assert _kl(model, original, data) < _kl(uncured, original, data)
    assert np.isfinite(_kl(model, original, held_out))


def test_no_teacher_is_kept_without_a_cure_and_cure_alone_is_refused():
    model = _llama()
    result = effc.Pipeline.from_text("remove-blocks{count=1,score=random}").run(model)
    assert getattr(result.model, "teacher", None) is None
    with pytest.raises(UnsupportedError, match="remove-blocks/share-blocks"):
        effc.Pipeline.from_text("cure").run(_llama(), effc.PassContext(calibration=_calib()))


def test_foldgpt_composes_with_gqsa_to_the_bsr_target(tmp_path):
    """The issue's pipeline on an HF LLaMA, to --target bsr: it compiles, the artifact runs close
    to the compressed torch model, shared weights are one site each (one BSR/codes copy)."""
    from effc.backends import bsr
    from effc.compile import compile_model

    text = (
        "block-gates{steps=4,loss=kd},remove-blocks{count=1,score=gates},"
        "share-blocks{group=2},cure{steps=4,lr=0.001},"
        "group-prune{sparsity=0.5,score=magnitude,group=16},quantize{bits=4,group=16},"
        "gqsa-train{stage=e2e,steps=4,samples=2}"
    )
    data = _calib(2)
    result = compile_model(
        _llama(), text, tmp_path / "o", target="bsr", ctx=effc.PassContext(calibration=data)
    )
    names = [r.name for r in result.report.records]
    assert names[:7] == [
        "block-gates",
        "remove-blocks",
        "share-blocks",
        "cure",
        "group-prune",
        "quantize",
        "gqsa-train",
    ]
    pack = next(r for r in result.report.records if r.name == "bsr-pack")
    layers = pack.stats["layers"]
    # 3 blocks: a shared pair (7 weights) + one alone (7) + lm_head
    assert len(layers) == 15, [r["layer"] for r in layers]
    (out,) = bsr.run(tmp_path / "o", data[0]).values()
    assert np.isfinite(out).all()


def test_an_encoder_is_cured_on_its_output_hidden_states():
    """BERT (no logits): the output term matches the output hidden states; the gap to the model
    before sharing shrinks, and each block's biases train (they stay per block)."""
    from test_remove_blocks import _bert

    original, model = _bert(), _bert()
    data = _calib(4, seq=12)
    bias = model.encoder.layer[1].attention.self.query.bias.detach().clone()

    def gap(m):
        with torch.no_grad():
            return sum(
                float(
                    (
                        m(**{k: torch.from_numpy(v) for k, v in x.items()}).last_hidden_state
                        - original(
                            **{k: torch.from_numpy(v) for k, v in x.items()}
                        ).last_hidden_state
                    )
                    .pow(2)
                    .mean()
                )
                for x in data
            )

    uncured = _bert()
    effc.Pipeline.from_text("share-blocks{group=2}").run(uncured)
    result = effc.Pipeline.from_text("share-blocks{group=2},cure{steps=30,lr=0.001}").run(
        model, effc.PassContext(calibration=data)
    )
    stats = result.report.records[-1].stats
    assert stats["logits_loss_last"] < stats["logits_loss_first"]
    assert gap(model) < gap(uncured)
    layers = model.encoder.layer
    assert layers[0].attention.self.query.weight is layers[1].attention.self.query.weight
    assert not torch.equal(layers[1].attention.self.query.bias, bias)  # trained
