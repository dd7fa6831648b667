"""sequential=true (group-prune, nm-prune, quantize{method=gptq}): each block is calibrated on the
outputs of the already compressed blocks before it (SparseGPT / GPTQ's sequential mode)."""

import numpy as np
import pytest
import torch
from _helpers import token_calibration

import effc
from effc.errors import PassOptionError, UnsupportedError
from effc.ir.sites import read_weight, weight_sites

PIPELINES = [
    "group-prune{sparsity=0.5,group=16,score=obs,sequential=true}",
    "group-prune{sparsity=0.5,group=16,score=wanda,sequential=true}",
    "group-prune{sparsity=0.5,group=16,score=obs,scope=layer,sequential=true}",
    "nm-prune{n=2,m=4,score=obs,sequential=true}",
    "nm-prune{n=2,m=4,score=wanda,sequential=true}",
    "group-prune{sparsity=0.5,group=16,score=obs},quantize{bits=4,group=16,method=gptq,sequential=true}",
]


def _weights(result) -> dict[str, torch.Tensor]:
    return {s.fqn: read_weight(s).clone() for s in weight_sites(result.model)}


def _run(text, model, calib=None):
    ctx = effc.PassContext(calibration=calib or token_calibration(n=4))
    return effc.Pipeline.from_text(text).run(model, ctx)


def _llama():
    from effc.models import BUILTINS

    return BUILTINS["tiny-llama"][0]()


@pytest.mark.parametrize("text", PIPELINES)
def test_fx_block_by_block_matches_whole_model_runs_on_onnx(text, llama_onnx):
    """FX runs each block on the cached outputs of the block before it; ONNX runs the whole model
    once per stage. Both must see the same activations, so they give the same weights."""
    fx = _run(text, _llama())
    onnx = _run(text, str(llama_onnx["dynamo"]))
    a, b = _weights(fx), _weights(onnx)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
        assert torch.equal(a[k] == 0, b[k] == 0), k
    stages = [r.stats["stages"] for r in fx.report.records if "stages" in r.stats]
    assert stages == [3]  # two blocks, then lm_head


@pytest.mark.parametrize("text", PIPELINES)
def test_only_the_blocks_after_the_first_see_different_inputs(text):
    """The first block's inputs do not depend on any compressed layer, so its weights equal the
    non-sequential pass's; every later layer is calibrated on compressed inputs and moves."""
    seq = _weights(_run(text, _llama()))
    once = _weights(_run(text.replace(",sequential=true", ""), _llama()))
    for k in seq:
        if k.startswith("model.layers.0."):
            torch.testing.assert_close(seq[k], once[k], rtol=0, atol=0)
        else:
            assert not torch.equal(seq[k], once[k]), k


def test_sequential_prunes_exactly_the_budget_and_records_masks():
    result = _run("group-prune{sparsity=0.5,group=16,score=obs,sequential=true}", _llama())
    assert result.report.records[0].stats["sparsity"] == 0.5
    for s in weight_sites(result.model):
        if s.op != "linear" or "embed" in s.fqn:
            continue
        mask = result.model.compression.sites[s.fqn].mask
        w = read_weight(s).view(mask.shape[0], mask.shape[1], 16)
        assert torch.all(w[~mask] == 0) and abs(float(mask.float().mean()) - 0.5) < 0.01, s.fqn


def test_sequential_keeps_the_sensitivity_allocation():
    text = "group-prune{sparsity=0.5,group=16,score=obs,allocate=sensitivity,sequential=true}"
    seq = _run(text, _llama()).report.records[0].stats
    once = _run(text.replace(",sequential=true", ""), _llama())
    assert seq["allocation"] == once.report.records[0].stats["allocation"]
    assert seq["sparsity"] == 0.5


def test_sequential_option_errors():
    for text, match in [
        ("group-prune{score=magnitude,sequential=true}", "score=wanda or score=obs"),
        ("group-prune{score=obs,scope=global,sequential=true}", "scope=row or scope=layer"),
        ("nm-prune{score=magnitude,sequential=true}", "score=wanda or score=obs"),
        ("quantize{method=rtn,sequential=true}", "use method=gptq"),
    ]:
        with pytest.raises(PassOptionError, match=match):
            effc.Pipeline.from_text(text)


class _NoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))

    def example_inputs(self):
        return {"x": torch.randn(4, 32)}


def test_a_model_without_blocks_is_a_clear_error():
    calib = [
        {"x": np.random.default_rng(i).standard_normal((4, 32)).astype(np.float32)}
        for i in range(2)
    ]
    with pytest.raises(UnsupportedError, match="needs repeated blocks"):
        _run("group-prune{score=obs,sequential=true}", _NoBlocks(), calib)
