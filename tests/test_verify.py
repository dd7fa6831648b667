"""The verifier knows the model's own fp32 noise: exact rewrites of an ill-conditioned model
(channel attention over L2-normalised q/k, a BatchNorm, a 1x1 conv chain; legacy export) pass,
and wrong rewrites of the same model are still rejected."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import effc
from effc.errors import VerificationError
from effc.instruments import VerifyInstrument
from effc.ir.model import OnnxModel
from effc.ir.torch_io import export_onnx
from effc.numerics import FLOOR_MULTIPLE
from effc.pass_base import Pass, PassResult
from effc.registry import PASSES


class ChannelAttentionSR(nn.Module):
    """conv -> 1x1 -> 1x1 -> BN -> channel attention (normalised q/k, temperature 20) -> tanh,
    plus a 1x1 conv with bias before a padded 3x3 conv."""

    def __init__(self, c: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.pw1, self.pw2 = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1, bias=False)
        self.pre = nn.Conv2d(c, c, 1)
        self.tail = nn.Conv2d(c, 3, 3, padding=1)
        with torch.no_grad():
            # large pointwise gains: the 1x1 chain's fused product rounds past atol 1e-5
            self.head.weight.mul_(3)
            self.pw1.weight.mul_(30)
            self.pw2.weight.mul_(30)
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.05, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x):
        h = self.bn(self.pw2(self.pw1(self.head(x))))
        b, c, hh, ww = h.shape
        q, k, v = self.qkv(h).view(b, 3, c, hh * ww).unbind(1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) * 20.0, dim=-1)
        h = torch.tanh(self.proj((attn @ v).view(b, c, hh, ww)) + h)
        return self.tail(self.pre(h))

    def example_inputs(self):
        return {"x": torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))}


def _model() -> OnnxModel:
    module = ChannelAttentionSR()
    return OnnxModel(export_onnx(module, module.example_inputs(), legacy=True))


# the convs in graph order: head, pw1, pw2 (the BatchNorm folded in by the exporter), qkv,
# proj, pre, tail, mix
CONVS = ["head", "pw1", "pw2", "qkv", "proj", "pre", "tail"]


def _conv(graph, name: str) -> ir.Node:
    return [n for n in graph if n.op_type == "Conv"][CONVS.index(name)]


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=value.name)


def _wrong_bn_axis(graph) -> None:
    """The BatchNorm folded into pw2 along its input channels instead of its outputs (the
    exporter folded it right: undo that scale on the output axis, apply it on the input axis)."""
    bn = ChannelAttentionSR().bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    conv = _conv(graph, "pw2")
    w = conv.inputs[1].const_value.numpy()
    _set(conv.inputs[1], w / scale[:, None, None, None] * scale[None, :, None, None])


def _transposed_weight(graph) -> None:
    conv = _conv(graph, "proj")
    _set(conv.inputs[1], conv.inputs[1].const_value.numpy().transpose(1, 0, 2, 3))


def _pointwise_into_padded_conv(graph) -> None:
    """Fold ``pre`` (1x1 with bias) into the padded 3x3 ``tail``: right inside, wrong at the border
    (the zero padding would have to be pre's bias)."""
    pre, tail = _conv(graph, "pre"), _conv(graph, "tail")
    w1, b1 = (v.const_value.numpy() for v in pre.inputs[1:3])
    w3, b3 = (v.const_value.numpy() for v in tail.inputs[1:3])
    _set(tail.inputs[1], np.einsum("ocij,cd->odij", w3, w1[:, :, 0, 0]))
    _set(tail.inputs[2], b3 + w3.sum((2, 3)) @ b1)
    tail.replace_input_with(0, pre.inputs[0])
    graph.remove(pre, safe=True)


WRONG = {
    "bn-wrong-axis": _wrong_bn_axis,
    "transposed-weight": _transposed_weight,
    "pointwise-into-padded-conv": _pointwise_into_padded_conv,
}


@pytest.fixture
def wrong_pass(monkeypatch):
    """A lossless-declared pass named ``wrong{rewrite=...}`` that applies a broken rewrite."""

    class Wrong(Pass):
        name = "wrong"
        kinds = ("onnx",)

        @dataclass
        class Options:
            rewrite: str = "transposed-weight"

        def run(self, model, ctx):
            WRONG[self.options.rewrite](model.model.graph)
            return PassResult(model, True, {})

    monkeypatch.setitem(PASSES, "wrong", Wrong)


def _images(n=2):
    rng = np.random.default_rng(1)
    return [{"x": rng.random((1, 3, 24, 24)).astype(np.float32)} for _ in range(n)]


def test_exact_fusion_of_an_ill_conditioned_model_passes_within_its_noise_floor():
    ctx = effc.PassContext(calibration=_images())
    result = effc.Pipeline.from_text(
        "fixpoint(cleanup,fuse)", instruments=[VerifyInstrument()]
    ).run(_model(), ctx)
    fused = [r for r in result.report.records if r.name == "fuse" and r.modified]
    assert fused and fused[0].stats["linear-chain"] == 1
    for r in result.report.records:
        assert r.error["ok"], r.error
        if not r.error["identical"]:  # the fused chain rounds: a few times the model's noise
            assert r.error["floor_ratio"] <= 4, r.error


@pytest.mark.parametrize("rewrite", sorted(WRONG))
def test_wrong_rewrites_of_the_same_model_are_rejected(rewrite, wrong_pass):
    ctx = effc.PassContext(calibration=_images())
    pipeline = effc.Pipeline.from_text(
        f"wrong{{rewrite={rewrite}}}", instruments=[VerifyInstrument()]
    )
    with pytest.raises(VerificationError, match="noise floor") as info:
        pipeline.run(_model(), ctx)
    ratio = float(str(info.value).split("x the model's fp32 noise floor")[0].rsplit(", ", 1)[1])
    assert ratio > 100 * FLOOR_MULTIPLE, str(info.value)


def test_a_layout_only_pass_must_be_bit_identical(wrong_pass, monkeypatch):
    monkeypatch.setattr(PASSES["wrong"], "bitwise", True)
    with pytest.raises(VerificationError, match="only moves data"):
        effc.Pipeline.from_text("wrong", instruments=[VerifyInstrument()]).run(
            _model(), effc.PassContext(calibration=_images())
        )


def test_outputs_past_the_fixed_tolerance_pass_within_the_floor_multiple():
    from effc.numerics import compare_outputs

    ref = [np.array([1e-3, 5.0], dtype=np.float32)]
    out = [np.array([1e-3 + 2e-5, 5.0], dtype=np.float32)]  # 2e-5 off an element near zero
    assert not compare_outputs(ref, out)["ok"]
    ok = compare_outputs(ref, out, floors=[1e-5])
    assert ok["ok"] and ok["floor_ratio"] == pytest.approx(2.0, rel=1e-3)
    assert not compare_outputs(ref, out, floors=[1e-6])["ok"]  # 20x the floor
