"""share-blocks on HF LLaMA (FX): blocks in a group read one Parameter per linear weight, norms
stay per block, the model equals one built with those weights, still generates, and its state
holds each shared weight once."""

from __future__ import annotations

import pytest
import torch
from test_remove_blocks import _calib, _llama

import effc
from effc.errors import PassOptionError, UnsupportedError


def test_first_shares_the_first_blocks_weights_and_keeps_norms():
    model = _llama()
    reference = _llama()
    with torch.no_grad():  # what sharing group 0-1 and 2-3 with choose=first means
        for a, b in ((0, 1), (2, 3)):
            src, dst = reference.model.layers[a], reference.model.layers[b]
            for (_n, m), (_, d) in zip(src.named_modules(), dst.named_modules()):
                if isinstance(m, torch.nn.Linear):
                    d.weight.copy_(m.weight)
            torch.nn.init.normal_(dst.input_layernorm.weight, 1.0, 0.1)
    with torch.no_grad():  # the norms the shared model keeps are the reference's
        for i in (1, 3):
            model.model.layers[i].input_layernorm.weight.copy_(
                reference.model.layers[i].input_layernorm.weight
            )
    result = effc.Pipeline.from_text("share-blocks{group=2}").run(model)
    stats = result.report.records[0].stats
    layers = model.model.layers
    assert layers[0].mlp.up_proj.weight is layers[1].mlp.up_proj.weight
    assert layers[2].self_attn.q_proj.weight is layers[3].self_attn.q_proj.weight
    assert layers[1].mlp.up_proj.weight is not layers[2].mlp.up_proj.weight
    assert layers[0].input_layernorm.weight is not layers[1].input_layernorm.weight
    shared = sum(p.numel() for n, p in layers[0].named_parameters() if "layernorm" not in n)
    assert stats["parameters_before"] - stats["parameters_after"] == 2 * shared
    assert len(dict(model.named_parameters())) < len(
        dict(model.named_parameters(remove_duplicate=False))
    )
    blocks = result.model.compression.blocks
    assert blocks["model.layers.1"].shares_with == "model.layers.0"
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert torch.equal(
        model.generate(ids, max_new_tokens=5, do_sample=False),
        reference.generate(ids, max_new_tokens=5, do_sample=False),
    )


def test_mean_shares_the_groups_mean_and_composes_with_removal():
    model = _llama()
    w = [model.model.layers[i].mlp.down_proj.weight.detach().clone() for i in range(4)]
    result = effc.Pipeline.from_text(
        "remove-blocks{count=1,score=random},share-blocks{group=3,choose=mean}"
    ).run(model, effc.PassContext(calibration=_calib(), seed=3))
    (removed,) = result.report.records[0].stats["removed"]
    kept = [w[i] for i in range(4) if i != removed]
    torch.testing.assert_close(
        model.model.layers[2].mlp.down_proj.weight, torch.stack(kept).mean(0)
    )
    assert result.report.records[1].stats["groups"] == [
        ["model.layers.0", "model.layers.1", "model.layers.2"]
    ]


def test_fit_is_the_damped_least_squares_weight_and_fits_equal_weights_to_themselves():
    """fit_shared against lstsq on the stacked system: [X_1; X_2; sqrt(d) I] W^T = [X_1 W_1^T;
    X_2 W_2^T; sqrt(d) W_mean^T], whose outputs' error beats first's and mean's; output_error
    is the relative error of one block's outputs."""
    from effc.passes.share_blocks import FIT_DAMP, fit_shared, output_error

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 12, generator=g, dtype=torch.float64) * s for s in (1.0, 3.0)]
    xs[1][:, 5] = 0  # a direction only block 0 sees
    ws = [torch.randn(7, 12, generator=g, dtype=torch.float64) for _ in xs]
    hs = [x.T @ x for x in xs]
    got = fit_shared(ws, hs)
    d = FIT_DAMP * sum(hs).diagonal().mean()
    a = torch.cat([*xs, d.sqrt() * torch.eye(12, dtype=torch.float64)])
    b = torch.cat([*(x @ w.T for x, w in zip(xs, ws)), d.sqrt() * (ws[0] + ws[1]).T / 2])
    want = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)

    def loss(v):  # what fit minimises, without the damping: the outputs' squared error
        return sum(float((x @ (v - w).T).norm() ** 2) for x, w in zip(xs, ws))

    for other in (ws[0], ws[1], (ws[0] + ws[1]) / 2):  # first, the other block's, mean
        assert loss(got) < loss(other)
    torch.testing.assert_close(fit_shared([ws[0], ws[0]], hs), ws[0], rtol=1e-9, atol=1e-9)
    assert output_error(ws[1], ws[1], hs[1]) == 0
    err = ws[0] - got
    assert output_error(ws[0], got, hs[0]) == pytest.approx(
        float((xs[0] @ err.T).norm() ** 2 / (xs[0] @ ws[0].T).norm() ** 2)
    )


@torch.no_grad()
def _logit_error(model, reference, ids):
    return float((model(ids).logits - reference(ids).logits).pow(2).mean())


def test_fit_shares_weights_whose_outputs_stay_closest_and_reports_their_error():
    """On calibration text the fitted shared weights keep the model's logits closer to the
    unshared model's than the first block's or the mean weights do."""
    ids = torch.from_numpy(_calib(4, 16)[0]["input_ids"])
    reference = _llama()
    errors = {}
    for choose in ("first", "mean", "fit"):
        model = _llama()
        result = effc.Pipeline.from_text(f"share-blocks{{group=2,choose={choose}}}").run(
            model, effc.PassContext(calibration=_calib(4, 16))
        )
        stats = result.report.records[0].stats
        assert model.model.layers[0].mlp.up_proj.weight is model.model.layers[1].mlp.up_proj.weight
        errors[choose] = _logit_error(model, reference, ids)
    assert ("output_rel_error_mean" in stats) and 0 < stats["output_rel_error_mean"] < 1
    assert stats["output_rel_error_max"] >= stats["output_rel_error_mean"]
    assert errors["fit"] < min(errors["first"], errors["mean"]), errors


def test_sequential_fit_fits_later_groups_on_the_shared_model():
    """sequential=true: the first group sees the same inputs as the one-run fit (same weights);
    a later group is fitted on the activations the shared first group gives, which the one-run
    fit never sees, and the logits end closer to the unshared model's."""
    ids = torch.from_numpy(_calib(4, 16)[0]["input_ids"])
    reference = _llama()
    models, errors = {}, {}
    for seq in (False, True):
        model = models[seq] = _llama()
        text = f"share-blocks{{group=2,choose=fit,sequential={str(seq).lower()}}}"
        effc.Pipeline.from_text(text).run(model, effc.PassContext(calibration=_calib(4, 16)))
        errors[seq] = _logit_error(model, reference, ids)
    a, b = (models[s].model.layers for s in (False, True))
    torch.testing.assert_close(a[0].mlp.up_proj.weight, b[0].mlp.up_proj.weight)
    assert not torch.allclose(a[2].mlp.up_proj.weight, b[2].mlp.up_proj.weight)
    assert errors[True] < errors[False], errors


def test_fit_needs_calibration():
    with pytest.raises(effc.errors.InputError, match="calib"):
        effc.Pipeline.from_text("share-blocks{choose=fit}").run(_llama())


@pytest.mark.parametrize(
    "text, error",
    [
        ("share-blocks{group=1}", PassOptionError),
        ("share-blocks{choose=best}", PassOptionError),
        ("share-blocks{sequential=true}", PassOptionError),
        ("quantize{bits=8,group=16},share-blocks", UnsupportedError),
    ],
)
def test_bad_requests_are_one_line_errors(text, error):
    with pytest.raises(error):
        effc.Pipeline.from_text(text).run(_llama())


def test_the_artifact_stores_a_shared_weight_once(tmp_path):
    import numpy as np

    from effc.backends import onnxruntime as ort_backend
    from effc.compile import compile_model

    compile_model(_llama(), "cleanup", tmp_path / "plain")
    shared = compile_model(_llama(), "share-blocks{group=2}", tmp_path / "shared")
    size = {k: (tmp_path / k / "model.onnx").stat().st_size for k in ("plain", "shared")}
    per_block = sum(
        p.numel() * 4 for n, p in _llama().model.layers[0].named_parameters() if "norm" not in n
    )
    assert size["plain"] - size["shared"] >= 2 * per_block * 0.95, size
    ids = np.random.default_rng(0).integers(0, 128, (1, 16))
    x = {"input_ids": ids, "attention_mask": np.ones((1, 16), np.int64)}
    (got,) = ort_backend.run(tmp_path / "shared", x).values()
    want = shared.model.run(x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("choose", ["first", "mean", "fit", "fit,sequential=true"])
def test_onnx_sharing_reads_one_initializer_and_equals_fx(tmp_path, choose):
    """The same pass on the ONNX export: blocks read the first block's (or the mean) weight
    initializers, the rest go, and the outputs equal the FX pass's."""
    import numpy as np

    from effc.ir.onnx_io import save_onnx
    from effc.pipeline import lower_to_onnx

    fx = effc.Pipeline.from_text("cleanup").run(_llama()).model
    onnx_model = lower_to_onnx(fx)
    save_onnx(onnx_model.model, tmp_path / "m.onnx")
    n0 = len(onnx_model.model.graph.initializers)
    text = f"share-blocks{{group=2,choose={choose}}}"
    ctx = lambda: effc.PassContext(calibration=_calib())  # noqa: E731
    result = effc.Pipeline.from_text(text).run(str(tmp_path / "m.onnx"), ctx())
    stats = result.report.records[0].stats
    assert stats["parameters_after"] < stats["parameters_before"]
    assert len(result.model.model.graph.initializers) < n0
    shared_fx = effc.Pipeline.from_text(text).run(_llama(), ctx())
    if choose.startswith("fit"):  # the same Hessians on both IRs: the same errors
        fx_stats = shared_fx.report.records[0].stats
        assert stats["output_rel_error_mean"] == pytest.approx(
            fx_stats["output_rel_error_mean"], rel=1e-3
        )
    ids = np.random.default_rng(1).integers(0, 128, (1, 16))
    x = {"input_ids": ids, "attention_mask": np.ones((1, 16), np.int64)}
    # fit solves with Hessians two executors summed in different orders: float noise the solve
    # scales by the Hessian's condition number (up to 2e-3 relative seen here)
    tol = 1e-3 if choose.startswith("fit") else 1e-4
    np.testing.assert_allclose(
        result.model.run(x)[0], shared_fx.model.run(x)[0], rtol=tol, atol=tol
    )


def _shared_and_reference():
    """The model after share-blocks{group=2} (choose=first), and an unshared model with the same
    weights everywhere (so each layer sees the same inputs in both)."""
    model = _llama()
    effc.Pipeline.from_text("share-blocks{group=2}").run(model)
    reference = _llama()
    with torch.no_grad():
        for a, b in ((0, 1), (2, 3)):
            src, dst = reference.model.layers[a], reference.model.layers[b]
            for (_n, m), (_, d) in zip(src.named_modules(), dst.named_modules()):
                if isinstance(m, torch.nn.Linear):
                    d.weight.copy_(m.weight)
    return model, reference


@pytest.mark.parametrize("kind", ["fx", "onnx"])
def test_a_shared_weight_is_one_site_whose_hessian_sums_its_blocks(tmp_path, kind):
    """GQSA on shared weights: one weight site per shared Parameter (named after its first
    block), and its calibration statistics (Hessian, column norms) are the sums over every block
    that reads it."""
    from effc.ir.model import FxModel
    from effc.ir.onnx_io import save_onnx
    from effc.ir.reducers import activation_norms, hessians
    from effc.ir.sites import weight_sites
    from effc.ir.torch_io import export_onnx
    from effc.pipeline import lower_to_onnx

    shared, reference = _shared_and_reference()
    data = _calib(2)
    examples = {k: torch.from_numpy(v) for k, v in data[0].items()}
    models = [FxModel(m, examples) for m in (shared, reference)]
    if kind == "onnx":
        # the shared model as effc lowers it (one initializer per shared weight); the reference
        # exported as is (its equal copies must stay separate layers)
        save_onnx(lower_to_onnx(models[0]).model, tmp_path / "0.onnx")
        with models[1].plain_outputs():
            save_onnx(export_onnx(reference, examples), tmp_path / "1.onnx")
        models = [effc.load(str(tmp_path / f"{i}.onnx")) for i in range(2)]
    shared_sites = weight_sites(models[0])
    ref_sites = {s.fqn: s for s in weight_sites(models[1])}
    assert len(shared_sites) == 15  # 7 per group of two blocks, and lm_head
    site = next(s for s in shared_sites if s.fqn.endswith("layers.0.mlp.down_proj"))
    assert [u[0] for u in site.users] == ["model.layers.1.mlp.down_proj"]
    pair = [ref_sites["model.layers.0.mlp.down_proj"], ref_sites["model.layers.1.mlp.down_proj"]]
    H = hessians(models[0], [site], data)[site.fqn]
    H_ref = hessians(models[1], pair, data)
    # HessianSum divides by the rows it saw: the shared site saw twice as many
    expected = (H_ref[pair[0].fqn] + H_ref[pair[1].fqn]) / 2
    torch.testing.assert_close(H, expected, rtol=1e-4, atol=1e-5)
    norms = activation_norms(models[0], [site], data)[site.fqn]
    ref = activation_norms(models[1], pair, data)
    torch.testing.assert_close(
        norms, (ref[pair[0].fqn] ** 2 + ref[pair[1].fqn] ** 2).sqrt(), rtol=1e-4, atol=1e-5
    )


def test_sequential_calibration_refuses_shared_weights():
    with pytest.raises(UnsupportedError, match="shared by several blocks"):
        effc.Pipeline.from_text(
            "share-blocks{group=2},quantize{bits=4,group=16,method=gptq,sequential=true}"
        ).run(_llama(), effc.PassContext(calibration=_calib()))


@pytest.mark.parametrize("stage", ["e2e", "bqpo"])
def test_training_trains_a_shared_weight_once_against_every_block(monkeypatch, stage):
    """e2e and bqpo: one stand-in for the weight the blocks of a group share, so it is trained
    once against every block that reads it (bqpo: the group is one unit whose loss sums its
    blocks, not block by block with the last writer winning), and it stays shared."""
    from effc.passes import gqsa_train

    model = _llama()
    data = _calib(2)
    first = effc.Pipeline.from_text("share-blocks{group=2},quantize{bits=4,group=16}").run(
        model, effc.PassContext(calibration=data)
    )
    seen = []
    real_train = gqsa_train.train

    def spy(groups, loss_of, steps, lr, **kw):
        layers = model.model.layers  # per group (0-1, 2-3): one stand-in read by both?
        seen.append(
            tuple(
                layers[a].mlp.up_proj is layers[a + 1].mlp.up_proj
                and type(layers[a].mlp.up_proj).__name__ == "FakeQuantLinear"
                for a in (0, 2)
            )
        )
        return real_train(groups, loss_of, steps, lr, **kw)

    monkeypatch.setattr(gqsa_train, "train", spy)
    result = effc.Pipeline.from_text(f"gqsa-train{{stage={stage},steps=3,samples=2}}").run(
        first.model, effc.PassContext(calibration=data)
    )
    # e2e: one run over the model; bqpo: one per group (blocks 0-1, then 2-3)
    assert seen == ([(True, True)] if stage == "e2e" else [(True, False), (False, True)])
    layers = model.model.layers
    assert type(layers[1].mlp.up_proj) is torch.nn.Linear
    assert layers[0].mlp.up_proj.weight is layers[1].mlp.up_proj.weight  # still shared
    state = result.model.compression.sites["model.layers.0.mlp.up_proj"]
    torch.testing.assert_close(layers[1].mlp.up_proj.weight.detach(), state.dequantized())
    if stage == "bqpo":
        stats = result.report.records[-1].stats
        assert stats["blocks"] == 4 and stats["shared_groups"] == 2

        def after(lr: float) -> float:  # the 4 blocks' summed error after 20 steps
            ctx = effc.PassContext(calibration=data)
            text = "share-blocks{group=2},quantize{bits=4,group=16}"
            quantized = effc.Pipeline.from_text(text).run(_llama(), ctx).model
            trained = effc.Pipeline.from_text(f"gqsa-train{{steps=20,samples=2,lr={lr}}}").run(
                quantized, ctx
            )
            return trained.report.records[-1].stats["block_mse_after"]

        # trained for real against both blocks (measured 0.0226 vs 0.0234: a random tiny model)
        assert after(1e-3) < 0.98 * after(1e-9)
