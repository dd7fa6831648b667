import pytest
import torch
from torch import nn

import effc
from effc.errors import InputError
from effc.ir.compression import BlockState, CompressionState, SiteState
from effc.ir.model import FxModel, OnnxModel
from effc.ir.sites import read_weight, weight_sites
from effc.ir.torch_io import export_onnx


def _compressed(model):
    return effc.Pipeline.from_text(
        "group-prune{score=magnitude,sparsity=0.5},quantize{bits=4,group=16}"
    ).run(model)


def test_state_round_trips_through_safetensors(tmp_path):
    from effc.models import BUILTINS

    result = _compressed(BUILTINS["tiny-llama"][0]())
    state = result.model.compression
    state.site("model.layers.0.mlp.up_proj").permutation = torch.randperm(64)
    block = BlockState(gate=0.25, removed=True, shares_with="model.layers.0")
    state.blocks["model.layers.1"] = block
    state.save(tmp_path / "c.safetensors")
    back = CompressionState.load(tmp_path / "c.safetensors")
    assert set(back.sites) == set(state.sites) and back.blocks["model.layers.1"] == block
    for fqn, s in state.sites.items():
        b = back.sites[fqn]
        for name in ("original", "mask", "codes", "scale", "zero", "permutation"):
            a, c = getattr(s, name), getattr(b, name)
            assert (a is None and c is None) or torch.equal(a, c), (fqn, name)
        assert (b.bits, b.group) == (s.bits, s.group)
    # the state is what the model carries: dequantized codes are the weights
    for site in weight_sites(result.model):
        if site.fqn in back.sites:
            torch.testing.assert_close(read_weight(site), back.sites[site.fqn].dequantized())


def _valid() -> SiteState:
    g = torch.Generator().manual_seed(0)
    return SiteState(
        group=16,
        bits=4,
        codes=torch.randint(0, 16, (4, 2, 16), dtype=torch.uint8, generator=g),
        scale=torch.rand(4, 2, generator=g) + 0.1,
        zero=torch.full((4, 2), 8, dtype=torch.uint8),
        mask=torch.ones(4, 2, dtype=torch.bool),
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: setattr(s, "codes", s.codes + 16), "exceeds 15"),
        (lambda s: setattr(s, "scale", s.scale[:, :1]), "scale must have shape"),
        (lambda s: setattr(s, "scale", -s.scale), "finite and positive"),
        (lambda s: setattr(s, "bits", 5), "bits must be"),
        (lambda s: setattr(s, "mask", s.mask.float()), "mask must be"),
        (lambda s: setattr(s, "codes", None), "come with codes"),
    ],
)
def test_validate_names_what_is_inconsistent(change, match):
    state = _valid()
    state.validate("w")
    change(state)
    with pytest.raises(InputError, match=match):
        state.validate("w")


def test_a_corrupt_state_file_is_a_clear_error(tmp_path):
    path = tmp_path / "c.safetensors"
    CompressionState({"w": _valid()}).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable compression state"):
        CompressionState.load(path)
    bad = CompressionState({"w": _valid()})
    bad.sites["w"].zero = torch.full((4, 2), 99, dtype=torch.uint8)
    bad.save(path)
    with pytest.raises(InputError, match="exceeds 15"):
        CompressionState.load(path)


class ScaledLinear(nn.Module):
    """A linear layer followed by a constant per-channel scale: ``fuse``'s affine rule folds the
    scale into the weight, unless the weight is compressed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(32, 16)
        self.register_buffer("gain", torch.rand(16) + 0.5)

    def forward(self, x):
        return self.fc(x) * self.gain

    def example_inputs(self):
        return {"x": torch.randn(2, 32)}


@pytest.mark.parametrize("kind", ["fx", "onnx"])
def test_fuse_never_refolds_a_compressed_weight(kind):
    def model():
        module = ScaledLinear().eval()
        if kind == "fx":
            return FxModel(module, module.example_inputs())
        return OnnxModel(export_onnx(module, module.example_inputs()))

    plain = effc.Pipeline.from_text("fuse{rules=[affine]}").run(model())
    assert plain.report.records[-1].stats["affine"] == 1  # the rule fires on a plain weight

    result = effc.Pipeline.from_text("quantize{bits=4,group=16},fuse{rules=[affine]}").run(model())
    assert result.report.records[-1].stats["affine"] == 0
    (site,) = [s for s in weight_sites(result.model) if s.op == "linear"]
    state = result.model.compression.sites[site.fqn]
    torch.testing.assert_close(read_weight(site), state.dequantized(), rtol=0, atol=0)


def test_state_survives_the_fx_to_onnx_lowering():
    """quantize runs on FX; tensorrt-legalize (ONNX only) reads the codes after the lowering."""
    from effc.models import BUILTINS

    result = effc.Pipeline.from_text("quantize{bits=4,group=16},tensorrt-legalize").run(
        BUILTINS["tiny-llama"][0]()
    )
    assert [r.kind for r in result.report.records] == ["fx", "fx->onnx", "onnx"]
    quantized = result.model.compression.quantized()
    assert len(quantized) == 15
    assert result.report.records[-1].stats["block_quantized_weights"] == len(quantized)
