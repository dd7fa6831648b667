"""Calibration at convolutions: the activations a conv weight multiplies are its unfolded input
patches per conv group, so x @ W_g^T reproduces the conv, on FX and on ONNX alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from effc.ir.calibrate import collect_site_inputs
from effc.ir.model import FxModel, OnnxModel
from effc.ir.reducers import hessians
from effc.ir.sites import weight_sites
from effc.ir.torch_io import export_onnx


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.full = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.grouped = nn.Conv2d(8, 4, 1, groups=2)

    def forward(self, x):
        return self.grouped(torch.relu(self.depthwise(self.full(x))))

    def example_inputs(self):
        return {"x": torch.randn(2, 3, 10, 12)}


def _inputs():
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((2, 3, 10, 12)).astype(np.float32)} for _ in range(2)]


def _model(kind):
    module = Convs().eval()
    if kind == "fx":
        return module, FxModel(module, module.example_inputs())
    return module, OnnxModel(export_onnx(module, module.example_inputs()))


@pytest.mark.parametrize("kind", ["fx", "onnx"])
def test_patches_times_weights_give_the_conv_outputs(kind):
    module, model = _model(kind)
    sites = {s.fqn: s for s in weight_sites(model) if s.op == "conv"}
    assert set(sites) == {"full", "depthwise", "grouped"}
    seen = {}
    collect_site_inputs(
        model, list(sites.values()), _inputs()[:1], lambda s, x: seen.update({s.fqn: x})
    )
    acts = {}
    hooks = [
        getattr(module, n).register_forward_hook(lambda m, a, o, n=n: acts.update({n: o.detach()}))
        for n in sites
    ]
    with torch.no_grad():
        module(torch.from_numpy(_inputs()[0]["x"]))
    for h in hooks:
        h.remove()
    for name, x in seen.items():
        conv = getattr(module, name)
        groups, rows, k = x.shape
        assert groups == conv.groups and k == conv.weight[0].numel()
        w = conv.weight.detach().reshape(groups, -1, k)  # (groups, out/groups, in/groups*kh*kw)
        y = torch.einsum("grk,gok->rgo", x, w).reshape(rows, -1)
        out = acts[name]
        if conv.bias is not None:
            out = out - conv.bias.detach()[None, :, None, None]
        expected = out.permute(0, 2, 3, 1).reshape(rows, -1)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_conv_hessians_are_per_group_and_agree_on_both_irs():
    found = {}
    for kind in ("fx", "onnx"):
        _, model = _model(kind)
        sites = [s for s in weight_sites(model) if s.op == "conv"]
        found[kind] = hessians(model, sites, _inputs())
    for name in ("full", "depthwise", "grouped"):
        fx, onnx = found["fx"][name], found["onnx"][name]
        assert fx.shape == onnx.shape
        torch.testing.assert_close(fx, onnx, rtol=1e-4, atol=1e-4)
    assert found["fx"]["depthwise"].shape == (8, 9, 9)  # one 3x3 Hessian per channel
    assert found["fx"]["grouped"].shape == (2, 4, 4)
