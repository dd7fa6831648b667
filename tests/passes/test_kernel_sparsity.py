import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effc
from effc.errors import InputError, PassOptionError
from effc.ir.onnx_io import save_onnx
from effc.ir.reducers import hessians
from effc.ir.sites import read_weight, weight_sites
from effc.ir.torch_io import export_onnx
from effc.models import MobileNetV1, TinyCNN
from effc.passes._channels import output_scales
from effc.passes.kernel_sparsity import exact_counts, op_type


def ctx(n=4, size=32, seed=0):
    g = np.random.default_rng(seed)
    c = effc.PassContext()
    c.calibration = [
        {"pixels": g.standard_normal((1, 3, size, size)).astype(np.float32)} for _ in range(n)
    ]
    return c


class ConvNet(torch.nn.Module):
    """Stem, depthwise, pointwise and linear layers without BatchNorm (the exporter folds
    BatchNorm into the convs, so an FX and an ONNX copy would start from different weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 8)
        self.eval()

    def forward(self, pixels):
        x = torch.relu(self.stem(pixels))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.fc(x.mean((2, 3)))

    def example_inputs(self):
        return {"pixels": torch.randn(1, 3, 32, 32)}


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    model = ConvNet()
    save_onnx(export_onnx(model, model.example_inputs()), path)
    return path


def test_operator_types_of_a_mobilenet():
    model = effc.Pipeline([]).run(MobileNetV1()).model
    kinds = {s.fqn: op_type(s) for s in weight_sites(model)}
    assert kinds["features.0.0"] == "conv"
    assert kinds["features.1.dw.0"] == "depthwise"
    assert kinds["features.1.pw.0"] == "pointwise"
    assert kinds["classifier.1"] == "linear"


def blocks_are_whole(mask: torch.Tensor, block) -> bool:
    m = mask.reshape(mask.shape[0], -1).float()
    r, c = block
    o, k = m.shape
    b = m.view(o // r, r, k // c, c)
    return bool((b.amin((1, 3)) == b.amax((1, 3))).all())


@pytest.mark.parametrize("pattern", ["4x1", "1x4", "2x2"])
def test_patterns_zero_whole_blocks_and_leave_depthwise_dense(pattern):
    tiny_cnn = TinyCNN()  # the passes edit the module they are given
    before = {
        s.fqn: read_weight(s).clone() for s in weight_sites(effc.Pipeline([]).run(TinyCNN()).model)
    }
    text = f"kernel-sparsity{{sparsity=0.5,patterns=[pointwise:{pattern}]}}"
    res = effc.Pipeline.from_text(text).run(tiny_cnn)
    stats = res.report.records[0].stats
    for site in weight_sites(res.model):
        w, state = read_weight(site), res.model.compression.get(site.fqn)
        kind = op_type(site)
        if kind == "depthwise" or site.fqn == "classifier":  # dense / 10 rows not divisible by 4
            assert state is None and torch.equal(w, before[site.fqn])
            continue
        block = (1, 9) if kind == "conv" else tuple(int(v) for v in pattern.split("x"))
        assert state.block == block and state.pattern == ("kernel" if kind == "conv" else pattern)
        assert blocks_are_whole(state.element_mask, block)
        assert torch.equal(w != 0, state.element_mask)  # kept weights are the original ones
        assert torch.equal(w[state.element_mask], before[site.fqn][state.element_mask])
    assert "does not divide" in stats["dense_layers"]["classifier"] or pattern == "1x4"
    assert stats["weights_zeroed"] == round(0.5 * stats["weights_eligible"])


@settings(max_examples=60, deadline=None)
@given(
    layers=st.lists(
        st.tuples(st.integers(1, 40), st.sampled_from([1, 2, 4, 9, 16])), min_size=1, max_size=5
    ),
    target=st.floats(0, 0.95),
)
def test_exact_budget_within_half_the_largest_block(layers, target):
    blocks = {f"l{i}": n for i, (n, _) in enumerate(layers)}
    sizes = {f"l{i}": b for i, (_, b) in enumerate(layers)}
    keep = exact_counts(blocks, sizes, dict.fromkeys(blocks, target), target)
    weights = sum(blocks[k] * sizes[k] for k in blocks)
    kept = sum(keep[k] * sizes[k] for k in blocks)
    big = max(blocks, key=lambda k: blocks[k] * sizes[k])
    assert all(0 <= keep[k] <= blocks[k] for k in blocks)
    if 0 < keep[big] < blocks[big]:  # not clipped
        assert abs(kept - round((1 - target) * weights)) <= sizes[big] / 2


@pytest.mark.parametrize("score", ["magnitude", "wanda", "obs", "obs,sequential=true"])
def test_same_weights_on_fx_and_onnx(score, cnn_onnx):
    text = f"kernel-sparsity{{sparsity=0.4,score={score}}}"
    fx = effc.Pipeline.from_text(text).run(ConvNet(), ctx())
    onnx = effc.Pipeline.from_text(text).run(str(cnn_onnx), ctx())
    fx_w = {s.fqn: read_weight(s) for s in weight_sites(fx.model)}
    onnx_w = {s.fqn: read_weight(s) for s in weight_sites(onnx.model)}
    assert fx_w.keys() == onnx_w.keys()
    for name, w in fx_w.items():
        assert torch.equal(w == 0, onnx_w[name] == 0), name
        torch.testing.assert_close(w, onnx_w[name], rtol=1e-3, atol=1e-5)
    fx_stats, onnx_stats = (r.report.records[0].stats for r in (fx, onnx))
    assert fx_stats["weights_zeroed"] == onnx_stats["weights_zeroed"]


class ConvBN(torch.nn.Module):
    """A 1x1 conv into a BatchNorm whose scales span three decades: scoring the conv's raw
    weights would rank its output channels by the wrong units."""

    def __init__(self, bn: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.pw = torch.nn.Conv2d(16, 32, 1, bias=not bn)
        self.bn = torch.nn.BatchNorm2d(32) if bn else torch.nn.Identity()
        if bn:
            g = torch.Generator().manual_seed(2)
            self.bn.weight.data = torch.logspace(-2, 1, 32)[torch.randperm(32, generator=g)]
            self.bn.running_var.data = torch.rand(32, generator=g) + 0.5
            self.bn.running_mean.data = torch.randn(32, generator=g)
        self.eval()

    def forward(self, pixels):
        return self.bn(self.pw(torch.relu(self.stem(pixels))))

    def example_inputs(self):
        return {"pixels": torch.randn(1, 3, 8, 8)}

    def folded(self) -> "ConvBN":
        """The same function with the BatchNorm folded into the conv."""
        out = ConvBN(bn=False)
        out.stem.load_state_dict(self.stem.state_dict())
        s = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        out.pw.weight.data = self.pw.weight.data * s[:, None, None, None]
        out.pw.bias.data = self.bn.bias.data - self.bn.running_mean * s
        return out


@pytest.mark.parametrize("score", ["magnitude", "obs"])
def test_batchnorm_scales_rank_channels_as_the_folded_model_would(score, tmp_path):
    """The kept blocks are the ones the BN-folded layer would keep, on FX and on an ONNX file
    that keeps its BatchNormalization node; without the scales the choice differs."""
    text = f"kernel-sparsity{{sparsity=0.5,score={score},patterns=[pointwise:4x1,conv:dense]}}"
    c = ctx(4, size=8)
    model = ConvBN()
    x = model.example_inputs()["pixels"]
    torch.testing.assert_close(model.folded()(x), model(x), rtol=1e-4, atol=1e-5)
    path = tmp_path / "convbn.onnx"
    torch.onnx.export(
        model,
        (x,),
        path,
        input_names=["pixels"],
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )
    masks = {}
    for name, m in (("fx", ConvBN()), ("folded", ConvBN().folded()), ("onnx", str(path))):
        res = effc.Pipeline.from_text(text).run(m, c)
        (st,) = [v for k, v in res.model.compression.sites.items() if "pw" in k or "Conv_1" in k]
        masks[name] = st.element_mask
        if name != "folded":
            assert res.report.records[0].stats["batchnorm_scaled"] == 1, name
    assert torch.equal(masks["fx"], masks["folded"])
    assert torch.equal(masks["onnx"], masks["folded"])
    raw = ConvBN().pw.weight.detach().reshape(8, 4, 16).abs().sum(1)  # 4x1 blocks, unscaled
    naive = torch.zeros_like(raw, dtype=torch.bool).view(-1)
    naive[raw.view(-1).topk(raw.numel() // 2).indices] = True
    got = masks["fx"].reshape(8, 4, 16)[:, 0, :]
    assert not torch.equal(got, naive.view_as(raw))


def test_sequential_is_the_identity_at_zero_sparsity_and_tracks_the_dense_model():
    """sequential=true solves each layer for the dense model's outputs on the already pruned
    layers' inputs: with nothing pruned it changes nothing (the ridge pulls towards W, not 0),
    and at 50% the whole model ends closer to the dense one than independent OBS."""
    c = ctx(8)
    dense = TinyCNN()
    xs = [torch.from_numpy(v["pixels"]) for v in c.calibration]
    ref = torch.cat([dense(x) for x in xs])
    zero = {}
    for seq in ("false", "true"):  # (OBS zeroes inputs calibration never excites, both ways)
        text = f"kernel-sparsity{{sparsity=0.0,score=obs,sequential={seq}}}"
        zero[seq] = {
            s.fqn: read_weight(s)
            for s in weight_sites(effc.Pipeline.from_text(text).run(TinyCNN(), c).model)
        }
    for k, w in zero["true"].items():
        torch.testing.assert_close(w, zero["false"][k], rtol=1e-4, atol=1e-5)
    errors = {}
    for seq in ("false", "true"):
        text = f"kernel-sparsity{{sparsity=0.5,score=obs,sequential={seq}}}"
        res = effc.Pipeline.from_text(text).run(TinyCNN(), c)
        with torch.no_grad():
            got = torch.cat([res.model.module(x) for x in xs])
        errors[seq] = float(((got - ref) ** 2).sum() / (ref**2).sum())
        stats = res.report.records[0].stats
        assert abs(stats["sparsity"] - 0.5) < 0.02
        if seq == "true":
            assert stats["sequential"]["samples"] == 8
            assert all(v["output_error"] >= 0 for v in stats["per_layer"].values())
    assert errors["true"] < errors["false"]
    with pytest.raises(PassOptionError, match="score=obs"):
        effc.Pipeline.from_text("kernel-sparsity{sequential=true}")


def test_obs_compensation_lowers_each_layers_output_error():
    errors = {}
    for score in ("magnitude", "obs"):
        res = effc.Pipeline.from_text(f"kernel-sparsity{{sparsity=0.5,score={score}}}").run(
            TinyCNN(), ctx()
        )
        model = res.model
        sites = [s for s in weight_sites(model) if model.compression.get(s.fqn)]
        hess = hessians(model, sites, ctx().calibration)
        errors[score] = {}
        scales = output_scales(model)  # errors after each layer's BatchNorm: what the net sees
        for s in sites:
            f = scales[s.fqn].double()[:, None] if s.fqn in scales else 1.0
            w0 = model.compression.get(s.fqn).original.reshape(s.shape[0], -1).double() * f
            d = read_weight(s).reshape(s.shape[0], -1).double() * f - w0
            h = hess[s.fqn].reshape(-1, *hess[s.fqn].shape[-2:]).double()[0]
            errors[score][s.fqn] = float(((d @ h) * d).sum() / ((w0 @ h) * w0).sum())
    for k, e in errors["obs"].items():
        assert e < errors["magnitude"][k], k


def test_sensitivity_allocation_varies_layers_and_keeps_the_budget():
    model = MobileNetV1()
    c = ctx(2, 64)
    text = "kernel-sparsity{sparsity=0.5,allocate=sensitivity,spread=0.3,sensitivity_samples=2}"
    res = effc.Pipeline.from_text(text).run(model, c)
    stats = res.report.records[0].stats
    layer = stats["allocation"]["layer_sparsity"]
    assert max(layer.values()) - min(layer.values()) > 0.1
    assert abs(stats["sparsity"] - 0.5) < 1e-3
    per = stats["per_layer"]
    assert all("output_error" in v for v in per.values())


def test_option_and_calibration_errors(tiny_cnn):
    for text in (
        "kernel-sparsity{patterns=[pointwise:4]}",
        "kernel-sparsity{patterns=[attention:4x1]}",
        "kernel-sparsity{sparsity=1.0}",
    ):
        with pytest.raises(PassOptionError):
            effc.Pipeline.from_text(text)
    with pytest.raises(InputError, match="calibration"):
        effc.Pipeline.from_text("kernel-sparsity{score=obs}").run(tiny_cnn)


@pytest.mark.parametrize("mixup", [0.0, 1.0])
def test_recover_distils_toward_the_dense_model_and_keeps_the_zeros(mixup):
    c = ctx(8)
    res = effc.Pipeline.from_text("kernel-sparsity{sparsity=0.6}").run(TinyCNN(), c)
    model = res.model
    zeros = {s.fqn: read_weight(s) == 0 for s in weight_sites(model)}
    dense = TinyCNN()
    x = torch.from_numpy(np.concatenate([s["pixels"] for s in c.calibration]))

    def kl(m):
        with torch.no_grad():
            ref, got = dense(x).log_softmax(-1), m(x).log_softmax(-1)
        return float(torch.nn.functional.kl_div(got, ref, log_target=True, reduction="batchmean"))

    before = kl(model.module)
    text = f"recover{{steps=60,lr=0.001,batch=4,mixup={mixup}}}"
    out = effc.Pipeline.from_text(text).run(model, c)
    stats = out.report.records[-1].stats
    assert stats["mixup"] == mixup
    assert stats["masked_weights"] == len([k for k in zeros if zeros[k].any()])
    assert stats["loss_last"] < stats["loss_first"]
    assert kl(out.model.module) < before
    for s in weight_sites(out.model):
        assert torch.equal(read_weight(s)[zeros[s.fqn]], torch.zeros(int(zeros[s.fqn].sum())))


def test_recover_needs_a_compressed_fx_model_and_calibration(cnn_onnx):
    with pytest.raises(InputError, match="compressed"):
        effc.Pipeline.from_text("recover{steps=2}").run(TinyCNN(), ctx(2))
    with pytest.raises(InputError, match="calibration"):
        effc.Pipeline.from_text("kernel-sparsity,recover{steps=2}").run(TinyCNN())
    with pytest.raises(effc.errors.EffcError):
        effc.Pipeline.from_text("kernel-sparsity,recover{steps=2}").run(str(cnn_onnx), ctx(2))
    with pytest.raises(PassOptionError, match="mixup"):
        effc.Pipeline.from_text("kernel-sparsity,recover{mixup=-1}")


def test_cli_calibrates_on_bundled_photographs(tmp_path, cli):
    pytest.importorskip("skimage")
    out = tmp_path / "out"
    code, stdout, stderr = cli(
        "compile",
        "builtin:tiny-cnn",
        "--passes",
        "kernel-sparsity{sparsity=0.3,score=obs}",
        "--calib",
        "images",
        "--calib-samples",
        "4",
        "-o",
        str(out),
    )
    assert code == 0, stderr
    report = (out / "report.json").read_text()
    assert '"samples": 4' in report and "output_error" in report
    code, _, stderr = cli(
        "compile",
        "builtin:tiny-llama",
        "--passes",
        "cleanup",
        "--calib",
        "images",
        "-o",
        str(tmp_path / "bad"),
    )
    assert code == 2 and "--calib images feeds one image input" in stderr
