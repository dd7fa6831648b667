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


def test_rearrange_on_onnx_is_a_clear_error(llama_onnx):
    with pytest.raises(UnsupportedError, match="rearrange"):
        effc.Pipeline.from_text("rearrange").run(str(llama_onnx["dynamo"]))
