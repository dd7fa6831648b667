"""The ``channel-linear`` fuse rule on conv-attention written with nn.Linear over transposed
channels (legacy exports, as such SR models ship): the transposes cancel, the Linear becomes a
1x1 conv, outputs stay within fp32 rounding; uses that do not transpose back block it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import op_types, run_pass
from torch import nn

import effc


class LinearAttention(nn.Module):
    """x.view(b, c, -1).transpose(-1, -2) -> Linear(qkv) -> chunk -> transpose back."""

    def __init__(self, dim=16, back=True, bias=True):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=bias)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.back = back

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.qkv(x.view(b, c, -1).transpose(-1, -2))
        q, k, v = t.chunk(3, dim=-1)
        if self.back:
            q, k, v = (p.transpose(-1, -2) for p in (q, k, v))
            attn = (q @ k.transpose(-1, -2)).softmax(-1)
            out = attn @ v
        else:  # the parts are used in (B, L, C) layout: nothing to cancel
            out = ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(-1, -2)
        return self.proj(out.reshape(b, c, h, w))


def _export(module, tmp_path, opset):
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    path = tmp_path / f"attn{opset}.onnx"
    torch.onnx.export(
        module.eval(), (torch.randn(1, 16, 6, 6),), str(path), opset_version=opset, dynamo=False
    )
    return effc.load(str(path))


@pytest.mark.parametrize("opset", [11, 14])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_over_transposed_channels_becomes_a_conv(tmp_path, opset, bias):
    model = _export(LinearAttention(bias=bias), tmp_path, opset)
    before = op_types(model)
    new, record, cmp = run_pass("fixpoint(cleanup,fuse)", model)
    after = op_types(new)
    # torch cancels k's two transposes itself: the input's and q's and v's go, k gets one
    assert before.count("Transpose") == 3 and after.count("Transpose") == 1, (before, after)
    assert "MatMul" in before and after.count("Conv") > before.count("Conv")
    assert cmp["ok"], cmp


def test_parts_used_untransposed_block_the_rule(tmp_path):
    model = _export(LinearAttention(back=False), tmp_path, 14)
    cleaned = effc.Pipeline.from_text("cleanup").run(model).model
    new, record, cmp = run_pass("fuse{rules=[channel-linear]}", cleaned)
    assert record.stats == {"channel-linear": 0}
    assert op_types(new) == op_types(cleaned)
    # the same model with the parts transposed back: it fires (the check above can fail)
    fired = effc.Pipeline.from_text("cleanup,fuse{rules=[channel-linear]}").run(
        _export(LinearAttention(), tmp_path, 14)
    )
    assert fired.report.records[-1].stats == {"channel-linear": 1}


def test_the_rewrite_is_checked_by_the_verifier(tmp_path, monkeypatch):
    """A wrong weight orientation (W instead of W^T, square so it still runs) is caught."""
    from effc.passes.fuse import channel_linear

    model = _export(LinearAttention(), tmp_path, 14)
    real = channel_linear.initializer

    def wrong(graph, base, array):
        if array.ndim == 3 and array.shape[0] == array.shape[1] * 3:
            c = array.shape[1]
            array = np.concatenate([a[:, :, 0].T[:, :, None] for a in np.split(array, 3)])
            assert array.shape[0] == 3 * c
        return real(graph, base, array)

    monkeypatch.setattr(channel_linear, "initializer", wrong)
    with pytest.raises(effc.errors.VerificationError):
        effc.Pipeline.from_text(
            "cleanup,fuse{rules=[channel-linear]}", instruments=[effc.VerifyInstrument()]
        ).run(model)
