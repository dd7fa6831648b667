"""FoldGPT's depth passes on the real SmolLM2-135M (reduced configurations of tools/quality;
marked slow): cosine removal beats random removal by far and stays within bounds of fp32, the
model still generates after removal, and block gates trained on real text rank blocks."""

from __future__ import annotations

import os

import pytest
import torch
from test_gqsa_real import _compress, smollm2  # noqa: F401 (the fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow


def test_cosine_removal_beats_random_and_the_model_still_generates(smollm2):  # noqa: F811
    from tools.quality.perplexity import perplexity

    folder, calib, evaluation = smollm2
    ppl = {}
    for name, text in {
        "fp32": "",
        "cosine3": "remove-blocks{count=3,samples=4}",
        "random3": "remove-blocks{count=3,score=random}",
    }.items():
        model, result = _compress(folder, text, calib)
        ppl[name] = perplexity(model, evaluation)
        if name == "cosine3":
            assert model.config.num_hidden_layers == 27 and len(model.model.layers) == 27
            assert len(result.report.records[0].stats["removed"]) == 3
            ids = torch.tensor([[504, 3575, 282, 4649, 314]])  # a short prompt
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
            assert out.shape == (1, 9)
    assert ppl["cosine3"] < 1.8 * ppl["fp32"], ppl
    assert ppl["random3"] > 2 * ppl["cosine3"], ppl


def test_block_gates_on_real_text_rank_every_block(smollm2):  # noqa: F811
    folder, calib, _ = smollm2
    _, result = _compress(folder, "block-gates{steps=4,samples=2,loss=lm}", calib)
    stats = result.report.records[0].stats
    assert len(stats["gates"]) == 30 and sorted(stats["ranking_weakest_first"]) == list(range(30))
    assert all(0 <= g <= 1 for g in stats["gates"])
    assert stats["lm_loss_first"] > 0
