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
