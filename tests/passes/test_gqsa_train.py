import numpy as np
import pytest
import torch

import effc
from effc.errors import EffcError, UnsupportedError
from effc.passes.quantize import dequantize


def _calib(n=4, seq=32):
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, 256, (1, seq)).astype(np.int64)} for _ in range(n)]


def _run(text):
    from effc.models import BUILTINS

    model = BUILTINS["tiny-llama"][0]()
    return model, effc.Pipeline.from_text(text).run(model, effc.PassContext(calibration=_calib()))


def test_bqpo_lowers_block_error_keeps_masks_and_stores_what_it_trained():
    model, result = _run(
        "group-prune{sparsity=0.5},quantize{bits=4,group=16},gqsa-train{steps=30,lr=0.001}"
    )
    stats = result.report.records[-1].stats
    assert stats["blocks"] == 2 and stats["tokens"] == 4 * 32 and stats["steps"] == 30
    assert stats["block_mse_after"] < stats["block_mse_first_step"]
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "lm_head"):
        notes = result.model.compression.sites[name]
        weight = model.get_submodule(name).weight.detach()
        expected = dequantize(notes.codes.float(), notes.scale, notes.zero.float(), notes.mask)
        torch.testing.assert_close(weight, expected, rtol=0, atol=0)
        pruned = ~notes.mask
        assert torch.all(weight.view(weight.shape[0], -1, 16)[pruned] == 0)
        assert torch.equal(notes.scale, notes.scale.half().float())
    assert isinstance(model.lm_head, torch.nn.Linear)  # fake-quant modules are gone


def test_e2e_trains_only_scales():
    model, result = _run("group-prune{sparsity=0.5},quantize{bits=4,group=16}")
    before = {k: v.codes.clone() for k, v in result.model.compression.sites.items()}
    ctx = effc.PassContext(calibration=_calib())
    after = effc.Pipeline.from_text("gqsa-train{stage=e2e,steps=4,lr=0.001}").run(result.model, ctx)
    stats = after.report.records[0].stats
    assert stats["layers"] == 15 and np.isfinite(stats["lm_loss_last_step"])
    for name, codes in before.items():
        notes = after.model.compression.sites[name]
        assert torch.equal(notes.codes, codes), name
        # the model carries exactly the stored codes and trained scales
        expected = dequantize(notes.codes.float(), notes.scale, notes.zero.float(), notes.mask)
        torch.testing.assert_close(
            model.get_submodule(name).weight.detach(), expected, rtol=0, atol=0
        )
    assert stats["norm_weights_trained"] == 0


def test_e2e_weight_lr_trains_the_kept_weights_under_the_fixed_masks():
    """weight_lr > 0: codes re-round as the weights move, pruned groups stay zero and what is
    stored is exactly what was trained; the same run without it keeps every code, and so does a
    weight_lr too small to move a weight across a rounding step while the scales move at lr=0.1
    (codes round on the starting scales: rounding on the moving ones flipped them wholesale)."""
    import copy

    from effc.models import BUILTINS

    ctx = effc.PassContext(calibration=_calib())
    original = BUILTINS["tiny-llama"][0]()
    changed = {}
    for weight_lr in (0.0, 0.01, 1e-9):
        model = copy.deepcopy(original)
        result = effc.Pipeline.from_text("group-prune{sparsity=0.5},quantize{bits=4,group=16}").run(
            model, ctx
        )
        codes = {k: v.codes.clone() for k, v in result.model.compression.sites.items()}
        trained = effc.Pipeline.from_text(
            f"gqsa-train{{stage=e2e,steps=8,lr={0.1 if weight_lr == 1e-9 else 0.001},"
            f"weight_lr={weight_lr}}}"
        ).run(result.model, ctx)
        assert trained.report.records[0].stats["weight_lr"] == weight_lr
        changed[weight_lr] = 0
        for name, notes in trained.model.compression.sites.items():
            changed[weight_lr] += int((notes.codes != codes[name]).sum())
            weight = model.get_submodule(name).weight.detach()
            expected = dequantize(notes.codes.float(), notes.scale, notes.zero.float(), notes.mask)
            torch.testing.assert_close(weight, expected, rtol=0, atol=0)
            assert torch.all(weight.view(weight.shape[0], -1, 16)[~notes.mask] == 0)
    assert changed[0.0] == 0 and changed[0.01] > 100 and changed[1e-9] == 0


def test_e2e_norms_option_trains_the_norm_weights_too():
    """norms=true: the RMSNorm gains move (and only they, besides the scales), codes stay, and the
    parameters' requires_grad flags are as before; norms=false leaves the gains alone. (Whether it
    helps is measured on SmolLM2 in tools/quality: tiny-llama's random weights give KLs of 1e-8.)"""
    import copy

    from effc.models import BUILTINS

    ctx = effc.PassContext(calibration=_calib())
    original = BUILTINS["tiny-llama"][0]()
    for norms in (False, True):
        model = copy.deepcopy(original)
        result = effc.Pipeline.from_text("group-prune{sparsity=0.5},quantize{bits=4,group=16}").run(
            model, ctx
        )
        codes = {k: v.codes.clone() for k, v in result.model.compression.sites.items()}
        frozen = {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if "norm" not in n and "proj" not in n and "lm_head" not in n
        }
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        trained = effc.Pipeline.from_text(
            f"gqsa-train{{stage=e2e,loss=kd,steps=20,lr=0.003,norms={str(norms).lower()}}}"
        ).run(result.model, ctx)
        stats = trained.report.records[0].stats
        assert stats["norms"] is norms
        # tiny-llama: two norms per block, two blocks, and the final norm
        assert stats["norm_weights_trained"] == (5 if norms else 0)
        moved = [
            n
            for n, p in model.named_parameters()
            if "norm" in n and not torch.equal(p, original.get_parameter(n))
        ]
        assert len(moved) == (5 if norms else 0)
        for name, c in codes.items():
            assert torch.equal(trained.model.compression.sites[name].codes, c), name
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), n
        assert grads == {n: p.requires_grad for n, p in model.named_parameters()}  # restored


def test_training_needs_a_torch_model_quantization_and_calibration(llama_onnx, tiny_llama):
    with pytest.raises(UnsupportedError, match="training needs a torch model"):
        effc.Pipeline.from_text("gqsa-train").run(
            str(llama_onnx["dynamo"]), effc.PassContext(calibration=_calib())
        )
    with pytest.raises(UnsupportedError, match="run quantize"):
        effc.Pipeline.from_text("gqsa-train").run(
            tiny_llama, effc.PassContext(calibration=_calib())
        )
    with pytest.raises(EffcError, match="needs calibration inputs"):
        effc.Pipeline.from_text("group-prune{score=magnitude},quantize,gqsa-train").run(tiny_llama)


@pytest.mark.parametrize("prune", ["nm-prune{n=2,m=4}", "group-prune{sparsity=0.5}"])
def test_bqpo_trains_pruned_only_weights_under_their_masks(prune):
    """The baselines (2:4, groups without quantization) get the same block-wise training: the
    kept weights move, the pruned ones stay exactly zero, the block error falls."""
    from effc.models import BUILTINS

    model = BUILTINS["tiny-llama"][0]()
    ctx = effc.PassContext(calibration=_calib())
    pruned = effc.Pipeline.from_text(prune).run(model, ctx)
    name = "model.layers.1.mlp.up_proj"
    before = model.get_submodule(name).weight.detach().clone()
    result = effc.Pipeline.from_text("gqsa-train{steps=30,lr=0.001}").run(pruned.model, ctx)
    stats = result.report.records[0].stats
    assert stats["block_mse_after"] < stats["block_mse_first_step"]
    after = model.get_submodule(name).weight.detach()
    assert not torch.equal(after, before)
    assert torch.equal(after == 0, before == 0)  # the same zeros: masks held
    with pytest.raises(UnsupportedError, match="run quantize first"):
        effc.Pipeline.from_text("gqsa-train{stage=e2e}").run(result.model, ctx)


def test_bqpo_starts_from_the_compensated_weights():
    """BQPO's first step sees GPTQ's weights (not the originals requantized): with lr ~ 0 the
    codes GPTQ chose survive unchanged."""
    from effc.models import BUILTINS

    model = BUILTINS["tiny-llama"][0]()
    ctx = effc.PassContext(calibration=_calib())
    text = "group-prune{sparsity=0.5,score=obs},quantize{bits=4,group=16,method=gptq}"
    result = effc.Pipeline.from_text(text).run(model, ctx)
    name = "model.layers.1.mlp.up_proj"
    codes = result.model.compression.sites[name].codes.clone()
    effc.Pipeline.from_text("gqsa-train{steps=1,lr=1e-12}").run(result.model, ctx)
    assert torch.equal(result.model.compression.sites[name].codes, codes)


@pytest.mark.parametrize(
    "text",
    [
        "gqsa-train{steps=0}",
        "gqsa-train{lr=0}",
        "gqsa-train{scale_lr=-1.0}",
        "gqsa-train{stage=e2e,weight_lr=-1.0}",
        "gqsa-train{batch=0}",
    ],
)
def test_bad_training_options_are_clear_errors(text):
    from effc.errors import PassOptionError

    with pytest.raises(
        PassOptionError,
        match="steps, samples and batch must be >= 1, lr > 0, scale_lr >= 0 and weight_lr >= 0",
    ):
        effc.Pipeline.from_text(text)


def test_bqpo_options_belong_to_bqpo():
    from effc.errors import PassOptionError

    for text in ("gqsa-train{stage=e2e,target=model}", "gqsa-train{stage=e2e,tail=true}"):
        with pytest.raises(PassOptionError, match="target and tail are bqpo options"):
            effc.Pipeline.from_text(text)


def _final_hidden_error(model, original, calib):
    """Mean squared distance of the last block's output from the original model's."""
    seen = []
    hooks = [
        m.model.layers[-1].register_forward_hook(lambda _m, _a, out: seen.append(out[0]))
        for m in (model, original)
    ]
    with torch.no_grad():
        errors = []
        for x in calib:
            ids = torch.from_numpy(x["input_ids"])
            model(input_ids=ids), original(input_ids=ids)
            errors.append(float(torch.nn.functional.mse_loss(seen[-2], seen[-1])))
    for h in hooks:
        h.remove()
    return sum(errors) / len(errors)


def test_bqpo_model_target_and_tail_train_towards_the_original_model():
    """target=model: every block's target is the original model's hidden state, so training
    lowers the distance of the compressed model's last hidden state from the original's; with
    tail=true, lm_head (outside the blocks) is trained last against the original logits."""
    import copy

    from effc.models import BUILTINS

    model = BUILTINS["tiny-llama"][0]()
    original = copy.deepcopy(model)
    ctx = effc.PassContext(calibration=_calib())
    text = "group-prune{sparsity=0.5},quantize{bits=4,group=16}"
    result = effc.Pipeline.from_text(text).run(model, ctx)
    one_shot = _final_hidden_error(model, original, _calib())
    head = model.lm_head.weight.detach().clone()
    trained = effc.Pipeline.from_text("gqsa-train{steps=40,lr=0.01,target=model,tail=true}").run(
        result.model, ctx
    )
    stats = trained.report.records[0].stats
    assert stats["target"] == "model" and stats["tail"] is True
    assert stats["tail_sites"] == ["lm_head"]
    assert stats["tail_mse_after"] < stats["tail_mse_before"]
    assert not torch.equal(model.lm_head.weight, head)
    notes = trained.model.compression.sites["lm_head"]
    expected = dequantize(notes.codes.float(), notes.scale, notes.zero.float(), notes.mask)
    torch.testing.assert_close(model.lm_head.weight.detach(), expected, rtol=0, atol=0)
    assert _final_hidden_error(model, original, _calib()) < one_shot


def _kl_to(model, original, calib) -> float:
    """Mean per-token KL(original || model) of the next-token distributions."""
    with torch.no_grad():
        kls = []
        for x in calib:
            ids = torch.from_numpy(x["input_ids"])
            p, q = (
                getattr(out, "logits", out)[0].log_softmax(-1)
                for out in (original(input_ids=ids), model(input_ids=ids))
            )
            kls.append(
                float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))
            )
    return sum(kls) / len(kls)


def test_bqpo_tail_kd_trains_lm_head_on_the_next_token_kl():
    """tail_loss=kd: lm_head's target is the original model's logits (the original layer on the
    original model's inputs), so the tail's reported KL after training is the compressed model's
    KL to the original model, measured here directly; training lowers it."""
    import copy

    from effc.models import BUILTINS

    model = BUILTINS["tiny-llama"][0]()
    original = copy.deepcopy(model)
    ctx = effc.PassContext(calibration=_calib())
    text = "group-prune{sparsity=0.5},quantize{bits=4,group=16}"
    result = effc.Pipeline.from_text(text).run(model, ctx)
    trained = effc.Pipeline.from_text(
        "gqsa-train{steps=40,lr=0.01,target=model,tail=true,tail_loss=kd}"
    ).run(result.model, ctx)
    stats = trained.report.records[0].stats
    assert stats["tail_loss"] == "kd" and "tail_mse_after" not in stats
    assert stats["tail_kd_after"] < stats["tail_kd_before"]
    assert stats["tail_kd_after"] == pytest.approx(_kl_to(model, original, _calib()), rel=1e-4)
    with pytest.raises(effc.errors.PassOptionError, match="tail_loss is an option of bqpo"):
        effc.Pipeline.from_text("gqsa-train{tail_loss=kd}")


def test_e2e_kd_moves_scales_towards_the_original_model():
    """loss=kd: only scales train (codes fixed), and the KL to the original model goes down."""
    import copy

    from effc.models import BUILTINS

    model = BUILTINS["tiny-llama"][0]()
    original = copy.deepcopy(model)
    ctx = effc.PassContext(calibration=_calib())
    result = effc.Pipeline.from_text("group-prune{sparsity=0.5},quantize{bits=4,group=16}").run(
        model, ctx
    )
    before = _kl_to(model, original, _calib())
    codes = {k: v.codes.clone() for k, v in result.model.compression.sites.items()}
    trained = effc.Pipeline.from_text("gqsa-train{stage=e2e,loss=kd,steps=20,lr=0.003}").run(
        result.model, ctx
    )
    stats = trained.report.records[0].stats
    assert stats["loss"] == "kd" and stats["kd_loss_last_step"] < stats["kd_loss_first_step"]
    for name, c in codes.items():
        assert torch.equal(trained.model.compression.sites[name].codes, c), name
    assert _kl_to(model, original, _calib()) < 0.9 * before


def test_kd_loss_is_an_e2e_option():
    from effc.errors import PassOptionError

    with pytest.raises(PassOptionError, match="loss, norms and weight_lr are e2e options"):
        effc.Pipeline.from_text("gqsa-train{stage=bqpo,loss=kd}")
    with pytest.raises(PassOptionError, match="loss, norms and weight_lr are e2e options"):
        effc.Pipeline.from_text("gqsa-train{stage=bqpo,norms=true}")
    with pytest.raises(PassOptionError, match="loss, norms and weight_lr are e2e options"):
        effc.Pipeline.from_text("gqsa-train{stage=bqpo,weight_lr=0.001}")


@pytest.mark.parametrize("grid", [False, True])
def test_fused_fake_quant_matches_the_autograd_expression(grid):
    """BQPO's one-function fake quantization: the same values and weight gradients as the
    op-by-op autograd expression (bit for bit), the scale gradient up to summation order; codes
    on both sides of the clamp, masked groups, and a fixed grid (e2e) or the trained scale."""
    from effc.passes.gqsa_train import _FakeQuant, round_ste

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(32, 6, 16, generator=g) * 0.06
    s0 = w0.abs().amax(-1) / 10  # some codes clamp at 0 and 15
    zero, qmax = torch.full((32, 6), 8.0), 15
    mask = (torch.rand(32, 6, generator=g) > 0.3).float()
    step = s0 * 1.1 if grid else None
    upstream = torch.randn(32, 6, 16, generator=g)

    def expression(w, scale, step, zero, mask, qmax):
        div = scale if step is None else step
        codes = torch.clamp(round_ste(w / div[..., None]) + zero[..., None], 0, qmax)
        return scale[..., None] * (codes - zero[..., None]) * mask[..., None]

    got = []
    for f in (expression, _FakeQuant.apply):
        w, s = w0.clone().requires_grad_(), s0.clone().requires_grad_()
        out = f(w, s, step, zero, mask, qmax)
        (out * upstream).sum().backward()
        got.append((out.detach(), w.grad, s.grad))
    (out, gw, gs), (out2, gw2, gs2) = got
    assert torch.equal(out, out2) and torch.equal(gw, gw2)
    assert (gw == 0).any() and (gw != 0).any()  # clamped and masked weights get no gradient
    # the scale's gradient sums two terms that partly cancel: compare at its own scale
    assert float((gs2 - gs).abs().max()) <= 1e-5 * float(gs.abs().max())


def test_e2e_on_an_encoder_distils_its_output_hidden_states():
    """BERT has no next-token logits: E2E-OQP's default loss there is KD on the output hidden
    states (scales train, codes stay); loss=lm is a one-line error."""
    from test_remove_blocks import _bert, _calib

    ctx = effc.PassContext(calibration=_calib(2, seq=12))
    text = "group-prune{sparsity=0.5,score=magnitude,group=16},quantize{bits=4,group=16}"
    result = effc.Pipeline.from_text(text).run(_bert(), ctx)
    codes = {k: v.codes.clone() for k, v in result.model.compression.sites.items()}
    trained = effc.Pipeline.from_text("gqsa-train{stage=e2e,steps=16,lr=0.0003}").run(
        result.model, ctx
    )
    stats = trained.report.records[0].stats
    assert stats["loss"] == "kd" and "lm_loss_first_step" not in stats
    assert stats["kd_loss_last_step"] < stats["kd_loss_first_step"]
    for name, c in codes.items():
        assert torch.equal(trained.model.compression.sites[name].codes, c), name
    result = effc.Pipeline.from_text("quantize{bits=4,group=16}").run(_bert(), ctx)
    with pytest.raises(UnsupportedError, match="loss=kd"):
        effc.Pipeline.from_text("gqsa-train{stage=e2e,steps=2,loss=lm}").run(result.model, ctx)


def test_e2e_holdout_keeps_the_parameters_that_did_best_on_held_out_samples():
    """At a learning rate that makes E2E-OQP overshoot, the held-out loss ends above where it
    started; with holdout=1 the last sample never trains, the scales end at the check with the
    lowest loss on it (never worse than before training), and the model is that state."""
    import copy

    from effc.models import BUILTINS

    model = BUILTINS["tiny-llama"][0]()
    original = copy.deepcopy(model)
    ctx = effc.PassContext(calibration=_calib())
    result = effc.Pipeline.from_text("group-prune{sparsity=0.5},quantize{bits=4,group=16}").run(
        model, ctx
    )
    before = _kl_to(model, original, _calib()[3:])
    result = effc.Pipeline.from_text(
        "gqsa-train{stage=e2e,loss=kd,steps=16,lr=0.3,samples=4,holdout=1}"
    ).run(result.model, ctx)
    stats = result.report.records[0].stats
    checks = dict(stats["held_out_checks"])
    assert sorted(checks) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert stats["held_out_loss_last"] > stats["held_out_loss_start"]  # the run overshoots
    assert stats["held_out_loss_kept"] == pytest.approx(min(checks.values()), rel=1e-5)
    assert stats["held_out_loss_kept"] <= stats["held_out_loss_start"]
    assert checks[stats["held_out_kept_step"]] == pytest.approx(stats["held_out_loss_kept"], 1e-5)
    after = _kl_to(model, original, _calib()[3:])
    assert after <= before * 1.05 and after < checks[16]
    with pytest.raises(effc.errors.PassOptionError, match="holdout < samples"):
        effc.Pipeline.from_text("gqsa-train{stage=e2e,samples=2,holdout=2}")
    with pytest.raises(effc.errors.PassOptionError, match="holdout is an option of stage=e2e"):
        effc.Pipeline.from_text("gqsa-train{holdout=1}")
