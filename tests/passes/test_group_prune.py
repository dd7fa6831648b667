import numpy as np
import pytest
import torch
from _helpers import token_calibration
from hypothesis import given, settings
from hypothesis import strategies as st

import effc
from effc.errors import PassOptionError, UnsupportedError
from effc.ir.reducers import hessians
from effc.ir.sites import read_weight, weight_sites
from effc.passes._obs import inverse_hessian_factor, layer_error, obs_prune, obs_scores
from effc.passes.group_prune import (
    allocate,
    group_scores,
    keep_counts,
    lower_hull,
    masks_for,
    row_mask,
)


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


@pytest.mark.parametrize("score", ["magnitude", "wanda", "obs"])
def test_group_prune_gives_the_same_weights_on_fx_and_onnx(score, llama_onnx):
    from effc.models import BUILTINS

    ctx = lambda: effc.PassContext(calibration=token_calibration())  # noqa: E731
    text = f"group-prune{{sparsity=0.5,group=16,score={score}}}"
    fx = effc.Pipeline.from_text(text).run(BUILTINS["tiny-llama"][0](), ctx())
    onnx = effc.Pipeline.from_text(text).run(str(llama_onnx["dynamo"]), ctx())
    fx_w = {s.fqn: read_weight(s) for s in weight_sites(fx.model)}
    onnx_w = {s.fqn: read_weight(s) for s in weight_sites(onnx.model)}
    assert fx_w.keys() == onnx_w.keys()
    for name, w in fx_w.items():
        if score == "obs":  # compensated weights: fp32 activations of two runtimes differ in ulps
            torch.testing.assert_close(w, onnx_w[name], rtol=1e-3, atol=1e-5)
            assert torch.equal(w == 0, onnx_w[name] == 0)
        else:
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


def _layer_problem(out=24, inp=64, rows=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)
    x = torch.randn(rows, inp, generator=g) @ mix  # correlated inputs: compensation matters
    return torch.randn(out, inp, generator=g), x, 2 * x.T @ x / rows


def test_obs_compensation_beats_plain_zeroing_on_the_layer_output():
    w, x, H = _layer_problem()
    U, dead = inverse_hessian_factor(H)
    mask = row_mask(obs_scores(w, U, dead, 16), 24 * 2)  # 50% of 4 groups per row
    compensated = obs_prune(w, (U, dead), mask, 16)
    zeroed = w * mask.repeat_interleave(16, dim=1)
    assert bool((compensated.view(24, 4, 16)[~mask] == 0).all())  # pruned groups stay zero
    assert bool((compensated != w).view(24, 4, 16)[mask].any())  # kept weights were updated
    err_c = float(((x @ (compensated - w).T) ** 2).sum())
    err_z = float(((x @ (zeroed - w).T) ** 2).sum())
    assert err_c < 0.8 * err_z
    assert layer_error(w, compensated, H) < layer_error(w, zeroed, H)


def test_lower_hull_drops_points_above_the_chords():
    pts = [(0.3, 1.0), (0.5, 3.0), (0.7, 3.5), (0.4, 0.5)]
    assert lower_hull(pts) == [(0.3, 1.0), (0.4, 0.5), (0.7, 3.5)]


def test_allocation_spends_the_budget_exactly_where_it_is_cheapest():
    sizes = {"cheap": 100, "dear": 100, "big": 300}
    curves = {
        "cheap": [(0.3, 0.0), (0.5, 0.1), (0.7, 0.2)],
        "dear": [(0.3, 0.0), (0.5, 10.0), (0.7, 30.0)],
        "big": [(0.3, 0.0), (0.5, 1.0), (0.7, 3.0)],
    }
    chosen = allocate(curves, sizes, 0.5)
    assert sum(sizes[k] * s for k, s in chosen.items()) == pytest.approx(0.5 * 500)
    assert chosen["cheap"] == pytest.approx(0.7) and chosen["dear"] == pytest.approx(0.3)
    assert chosen["big"] == pytest.approx(0.5)
    rounded = {"cheap": 0.706, "dear": 0.3, "big": 0.5}  # keeps 29 + 70 + 150: one short
    keep = keep_counts(sizes, rounded, 0.5)
    assert sum(keep.values()) == 250 and keep["big"] == 151  # the residual goes to the largest
    keep = keep_counts(sizes, rounded, 0.5, frozenset({"big"}))
    assert sum(keep.values()) == 250 and keep["big"] == 150 and keep["cheap"] == 30
    # a pinned layer's curve is one point: it stays there and the others take the budget
    curves["big"] = [(0.42, 0.0)]
    chosen = allocate(curves, sizes, 0.5)
    assert chosen["big"] == pytest.approx(0.42) and chosen["cheap"] == pytest.approx(0.7)
    assert sum(sizes[k] * s for k, s in chosen.items()) == pytest.approx(0.5 * 500)


def _zero_fraction(model) -> dict[str, float]:
    out = {}
    for s in weight_sites(model):
        if s.op == "linear":
            w = read_weight(s)
            out[s.fqn] = float((w.view(w.shape[0], -1, 16) == 0).all(-1).float().mean())
    return out


@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
def test_pin_fixes_a_layers_sparsity_and_the_others_keep_the_budget(allocation):
    from effc.models import BUILTINS

    text = f"group-prune{{sparsity=0.5,score=obs,allocate={allocation},pin=[lm_head:0.25]}}"
    result = effc.Pipeline.from_text(text).run(
        BUILTINS["tiny-llama"][0](), effc.PassContext(calibration=token_calibration())
    )
    stats = result.report.records[0].stats
    assert stats["groups_pruned"] == round(0.5 * stats["groups_total"])
    zero = _zero_fraction(result.model)
    assert zero["lm_head"] == pytest.approx(0.25, abs=1e-3)
    others = [v for k, v in zero.items() if k != "lm_head"]
    assert sum(others) / len(others) > 0.5  # they carry what lm_head does not prune
    if allocation == "uniform":
        assert stats["pin"]["layers"] == {"lm_head": 0.25}
        assert all(v == pytest.approx(stats["pin"]["others"], abs=0.01) for v in others)
    else:
        assert stats["allocation"]["pinned"] == {"lm_head": 0.25}
        assert "lm_head" not in stats["allocation"]["output_deviation_at_target"]


def test_pin_errors(tiny_llama):
    ctx = lambda: effc.PassContext(calibration=token_calibration())  # noqa: E731
    with pytest.raises(PassOptionError, match="entries NAME:SPARSITY"):
        effc.Pipeline.from_text("group-prune{pin=[lm_head]}")
    with pytest.raises(PassOptionError, match="entries NAME:SPARSITY"):
        effc.Pipeline.from_text("group-prune{pin=[lm_head:1.5]}")
    with pytest.raises(PassOptionError, match="not scope=global"):
        effc.Pipeline.from_text("group-prune{pin=[lm_head:0.5],scope=global}")
    with pytest.raises(PassOptionError, match="pin 'nothing' matches no compressible layer"):
        effc.Pipeline.from_text("group-prune{score=magnitude,pin=[nothing:0.5]}").run(tiny_llama)
    with pytest.raises(PassOptionError, match="matches every compressible layer"):
        effc.Pipeline.from_text("group-prune{score=magnitude,pin=[.:0.1,lm_head:0.1]}").run(
            tiny_llama
        )
    with pytest.raises(PassOptionError, match="leaves the others .* outside"):
        effc.Pipeline.from_text("group-prune{score=magnitude,pin=[layers:0.0]}").run(tiny_llama)
    with pytest.raises(PassOptionError, match=r"leave the others 0.595 .* range 0.45-0.55"):
        effc.Pipeline.from_text(
            "group-prune{score=obs,allocate=sensitivity,spread=0.05,pin=[lm_head:0.0]}"
        ).run(tiny_llama, ctx())
    with pytest.raises(PassOptionError, match=r"leave the others 0.407 .* range 0.45-0.55"):
        effc.Pipeline.from_text(
            "group-prune{score=obs,allocate=sensitivity,spread=0.05,pin=[lm_head:0.99]}"
        ).run(tiny_llama, ctx())


@pytest.mark.parametrize("metric", ["mse", "kl"])
def test_sensitivity_allocation_varies_layers_and_keeps_the_exact_budget(metric):
    from effc.models import BUILTINS

    result = effc.Pipeline.from_text(
        f"group-prune{{sparsity=0.5,score=obs,allocate=sensitivity,spread=0.25,metric={metric}}}"
    ).run(BUILTINS["tiny-llama"][0](), effc.PassContext(calibration=token_calibration()))
    stats = result.report.records[0].stats
    assert stats["allocation"]["metric"] == metric
    per_layer = stats["allocation"]["layer_sparsity"]
    assert len(set(per_layer.values())) > 2  # not uniform
    assert all(0.25 - 1e-6 <= v <= 0.75 + 1e-6 for v in per_layer.values())
    assert stats["groups_pruned"] == round(0.5 * stats["groups_total"])
    for s in weight_sites(result.model):
        w = read_weight(s)
        frac = float((w.view(w.shape[0], -1, 16) == 0).all(-1).float().mean())
        assert frac == pytest.approx(per_layer[s.fqn], abs=1e-3)


def test_sensitivity_allocation_needs_a_local_scope():
    with pytest.raises(PassOptionError, match="scope=row or scope=layer"):
        effc.Pipeline.from_text("group-prune{allocate=sensitivity,scope=global}")


def test_output_deviation_metrics():
    """mse: relative squared error; kl: mean KL(softmax(ref) || softmax(out)) over positions."""
    from effc.passes.group_prune import output_deviation

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 5, 11, generator=gen, dtype=torch.float64)
    out = ref + 0.3 * torch.randn(1, 5, 11, generator=gen, dtype=torch.float64)
    ids = np.zeros((1, 5), np.int64)

    class Fixed:
        def run(self, x):
            return [out.numpy(), ids]

    reference = [[ref.numpy(), ids]]
    mse = float(((out - ref) ** 2).sum() / (ref**2).sum())
    assert output_deviation(Fixed(), [{}], reference) == pytest.approx(mse, rel=1e-12)
    kl = torch.nn.functional.kl_div(
        out[0].log_softmax(-1), ref[0].log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert output_deviation(Fixed(), [{}], reference, "kl") == pytest.approx(float(kl), rel=1e-9)
    assert output_deviation(Fixed(), [{}], [[out.numpy(), ids]], "kl") == pytest.approx(
        0, abs=1e-12
    )


def _pbar(model, calibration) -> torch.Tensor:
    """The mean next-token probability of each vocabulary entry, from torch directly."""
    with torch.no_grad():
        probs = [
            model(input_ids=torch.from_numpy(x["input_ids"])).double().softmax(-1)
            for x in calibration
        ]
    flat = torch.cat([p.reshape(-1, p.shape[-1]) for p in probs])
    return flat.mean(0)


@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_logit_weight_ranks_the_logit_rows_by_predicted_probability(exponent):
    """The lm_head's mask is the top of its OBS scores times pbar^a over the whole layer (rows
    keep different counts, the layer's budget exact); the other layers keep rows alike."""
    from effc.models import BUILTINS
    from effc.passes.group_prune import keep_top

    calibration = token_calibration()
    model = BUILTINS["tiny-llama"][0]()
    pbar = _pbar(model, calibration)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    W = model.lm_head.weight.detach().clone()
    fxm = effc.ir.FxModel(model, model.example_inputs())
    head = next(s for s in weight_sites(fxm) if s.fqn == "lm_head")
    U, dead = inverse_hessian_factor(hessians(fxm, [head], calibration)["lm_head"])
    scores = obs_scores(W, U, dead, 16) * (pbar**exponent).float()[:, None]
    expected = keep_top(scores, round(0.5 * scores.numel()))

    result = effc.Pipeline.from_text(
        f"group-prune{{sparsity=0.5,score=obs,logit_weight={exponent}}}"
    ).run(fxm, effc.PassContext(calibration=calibration))
    stats = result.report.records[0].stats
    assert stats["logit_weight"]["layer"] == "lm_head"
    assert stats["logit_weight"]["positions"] == sum(x["input_ids"].size for x in calibration)
    mask = result.model.compression.sites["lm_head"].mask
    assert torch.equal(mask, expected)
    kept = mask.sum(1)
    assert int(kept.max()) > int(kept.min()) + 1  # rows differ
    order = pbar.argsort(descending=True)
    assert kept[order[:32]].float().mean() > kept[order[-32:]].float().mean()
    for name, notes in result.model.compression.sites.items():
        if name != "lm_head":  # row scope elsewhere: every row keeps half its groups
            assert set(notes.mask.sum(1).tolist()) == {notes.mask.shape[1] // 2}, name


def test_logit_weight_goes_through_the_sensitivity_allocation_and_onnx(llama_onnx):
    from effc.models import BUILTINS

    text = "group-prune{sparsity=0.5,score=obs,allocate=sensitivity,metric=kl,logit_weight=0.5}"
    ctx = lambda: effc.PassContext(calibration=token_calibration())  # noqa: E731
    fx = effc.Pipeline.from_text(text).run(BUILTINS["tiny-llama"][0](), ctx())
    onnx = effc.Pipeline.from_text(text).run(str(llama_onnx["dynamo"]), ctx())
    stats = fx.report.records[0].stats
    assert stats["groups_pruned"] == round(0.5 * stats["groups_total"])
    w = read_weight(next(s for s in weight_sites(fx.model) if s.fqn == "lm_head"))
    zero = (w.view(w.shape[0], -1, 16) == 0).all(-1)
    assert float(zero.float().mean()) == pytest.approx(
        stats["allocation"]["layer_sparsity"]["lm_head"], abs=1e-3
    )
    assert len(set((~zero).sum(1).tolist())) > 2
    onnx_w = {s.fqn: read_weight(s) for s in weight_sites(onnx.model)}
    assert torch.equal(onnx_w["lm_head"] == 0, w == 0)


def test_logit_weight_errors(tiny_llama):
    with pytest.raises(PassOptionError, match="'logit_weight' must be >= 0"):
        effc.Pipeline.from_text("group-prune{logit_weight=-1}")
    with pytest.raises(PassOptionError, match="not scope=global"):
        effc.Pipeline.from_text("group-prune{logit_weight=1,scope=global}")
    with pytest.raises(effc.EffcError, match="needs calibration inputs"):
        effc.Pipeline.from_text("group-prune{score=magnitude,logit_weight=1}").run(tiny_llama)
    with pytest.raises(UnsupportedError, match="computes the model's output logits; 0 of"):
        effc.Pipeline.from_text("group-prune{score=magnitude,logit_weight=1,skip=[lm_head]}").run(
            tiny_llama, effc.PassContext(calibration=token_calibration())
        )
