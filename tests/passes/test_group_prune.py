import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effc
from effc.errors import PassOptionError, UnsupportedError
from effc.ir.sites import read_weight, weight_sites
from effc.passes.group_prune import group_scores, masks_for, row_mask


def calibration(n=3, vocab=256, seq=16):
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64)} for _ in range(n)]


@settings(max_examples=50, deadline=None)
@given(
    out=st.integers(1, 12),
    ngroups=st.integers(1, 12),
    sparsity=st.floats(0, 0.99),
    seed=st.integers(0, 99),
)
def test_row_budget_hits_the_requested_count_and_keeps_the_best(out, ngroups, sparsity, seed):
    scores = torch.rand(out, ngroups, generator=torch.Generator().manual_seed(seed))
    keep = round((1 - sparsity) * out * ngroups)
    mask = row_mask(scores, keep)
    assert int(mask.sum()) == keep
    per_row = mask.sum(1)
    assert int(per_row.max() - per_row.min()) <= 1
    for r in range(out):  # every kept group outranks every pruned group of its row
        if 0 < per_row[r] < ngroups:
            assert scores[r][mask[r]].min() >= scores[r][~mask[r]].max()


@pytest.mark.parametrize("scope", ["row", "layer", "global"])
def test_budgets_hit_the_sparsity_exactly(scope):
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(10, 7, generator=g), "b": torch.rand(4, 9, generator=g) * 100}
    masks = masks_for(scores, 0.4, scope)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    if scope == "global":
        assert kept == round(0.6 * total)
    else:
        assert all(int(m.sum()) == round(0.6 * m.numel()) for m in masks.values())


def test_wanda_scores_weight_columns_by_activation_norms():
    w = torch.ones(2, 32)
    norms = torch.cat([torch.ones(16), 10 * torch.ones(16)])
    assert group_scores(w, 16).tolist() == [[16.0, 16.0]] * 2
    assert group_scores(w, 16, norms).tolist() == [[16.0, 160.0]] * 2


@pytest.mark.parametrize("score", ["magnitude", "wanda"])
def test_group_prune_gives_the_same_weights_on_fx_and_onnx(score, llama_onnx):
    from effc.models import BUILTINS

    ctx = lambda: effc.PassContext(calibration=calibration())  # noqa: E731
    text = f"group-prune{{sparsity=0.5,group=16,score={score}}}"
    fx = effc.Pipeline.from_text(text).run(BUILTINS["tiny-llama"][0](), ctx())
    onnx = effc.Pipeline.from_text(text).run(str(llama_onnx["dynamo"]), ctx())
    fx_w = {s.fqn: read_weight(s) for s in weight_sites(fx.model)}
    onnx_w = {s.fqn: read_weight(s) for s in weight_sites(onnx.model)}
    assert fx_w.keys() == onnx_w.keys()
    for name, w in fx_w.items():
        torch.testing.assert_close(w, onnx_w[name], rtol=0, atol=0)
        groups = w.view(w.shape[0], -1, 16)
        zero_groups = (groups == 0).all(-1)
        assert abs(float(zero_groups.float().mean()) - 0.5) < 1e-9, name
    record = fx.report.records[0]
    assert record.stats["sparsity"] == 0.5 and record.stats["untied"] == ["lm_head"]
    assert (
        record.error is not None and record.error["max_abs"] > 0
    )  # lossy: measured on calibration


def test_untied_lm_head_leaves_the_embedding_alone():
    from effc.models import BUILTINS

    model = BUILTINS["tiny-llama"][0]()
    emb = model.model.embed_tokens.weight.detach().clone()
    effc.Pipeline.from_text("group-prune{score=magnitude}").run(model)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert float((model.lm_head.weight == 0).float().mean()) >= 0.5


def test_wanda_without_calibration_is_a_clear_error(tiny_llama):
    with pytest.raises(effc.EffcError, match="needs calibration inputs"):
        effc.Pipeline.from_text("group-prune{score=wanda}").run(tiny_llama)


def test_bad_options():
    with pytest.raises(PassOptionError, match="'sparsity' must be in"):
        effc.Pipeline.from_text("group-prune{sparsity=1.5}")
    with pytest.raises(
        PassOptionError, match='one of "magnitude", "wanda"|one of magnitude, wanda'
    ):
        effc.Pipeline.from_text("group-prune{score=random}")


def test_group_must_divide_the_input(tiny_llama):
    with pytest.raises(UnsupportedError, match="group 48 does not divide"):
        effc.Pipeline.from_text("group-prune{group=48,score=magnitude}").run(tiny_llama)
