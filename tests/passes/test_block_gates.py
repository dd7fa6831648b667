"""block-gates on an HF LLaMA (FX): weights stay frozen and unchanged, gates land in [0, 1] in
the compression state, the budget pulls their mass to the kept fraction, a block that does
nothing gets the lowest gate, and remove-blocks{score=gates} removes by them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_remove_blocks import _calib, _llama

import effc
from effc.errors import PassOptionError, UnsupportedError


def test_gates_rank_an_idle_block_weakest_and_weights_stay(loss="kd"):
    """Distilling from the ungated model (random weights make next-token loss meaningless)."""
    model = _llama(idle=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = effc.Pipeline.from_text(
        f"block-gates{{steps=40,lr=0.05,rate=0.25,loss={loss}}},remove-blocks{{count=1,score=gates}}"
    ).run(model, effc.PassContext(calibration=_calib(4)))
    gates_stats, removal = (r.stats for r in result.report.records)
    gates = gates_stats["gates"]
    assert all(0.0 <= g <= 1.0 for g in gates)
    assert gates_stats["ranking_weakest_first"][0] == 1, gates
    assert removal["removed"] == [1]
    assert abs(sum(gates) / 4 - 0.75) < 0.15  # the budget term: mass of the kept blocks
    assert gates_stats["steps"] == 40 and gates_stats["seconds"] > 0
    # weights untouched (the gates are not applied); the removed block's are gone
    after = model.state_dict()
    assert torch.equal(
        after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.equal(
        after["model.layers.1.mlp.up_proj.weight"], before["model.layers.2.mlp.up_proj.weight"]
    )
    assert all(
        p.requires_grad == q.requires_grad
        for p, q in zip(model.parameters(), _llama().parameters())
    )


def test_bad_options_are_one_line_errors():
    with pytest.raises(PassOptionError):
        effc.Pipeline.from_text("block-gates{rate=1.5}").run(
            _llama(), effc.PassContext(calibration=_calib())
        )


def test_lm_loss_trains_on_the_text():
    result = effc.Pipeline.from_text("block-gates{steps=8,loss=lm}").run(
        _llama(), effc.PassContext(calibration=_calib(2))
    )
    stats = result.report.records[0].stats
    assert stats["lm_loss_first"] > 0 and len(stats["gates"]) == 4
    gates = result.model.compression.blocks
    assert [round(gates[f"model.layers.{i}"].gate, 4) for i in range(4)] == stats["gates"]


def test_an_encoder_trains_its_gates_on_its_output_hidden_states():
    """BERT has no next-token logits: loss=auto distils the output hidden states (the gates
    move and the distance they add is reported); loss=lm is a one-line error."""
    from test_remove_blocks import _bert

    result = effc.Pipeline.from_text("block-gates{steps=12,rate=0.25}").run(
        _bert(), effc.PassContext(calibration=_calib(seq=12))
    )
    stats = result.report.records[0].stats
    assert stats["loss"] == "kd" and len(stats["gates"]) == 4
    assert all(0.0 <= g <= 1.0 for g in stats["gates"]) and min(stats["gates"]) < 1.0
    assert stats["kd_loss_first"] >= 0 and np.isfinite(stats["kd_loss_last"])
    with pytest.raises(UnsupportedError, match="loss=kd"):
        effc.Pipeline.from_text("block-gates{steps=2,loss=lm}").run(
            _bert(), effc.PassContext(calibration=_calib(seq=12))
        )
