"""The DITN-style SR model: structure options, and the shipped trained weights beat bicubic."""

import pytest
import torch

from effc.models.ditn import DITN, DITNConfig, load_trained, partition, reverse


def test_output_is_upscaled_and_unfold_per_layer_is_the_same_function():
    torch.manual_seed(0)
    once = DITN(DITNConfig()).eval()
    per_layer = DITN(DITNConfig(unfold="per-layer")).eval()
    per_layer.load_state_dict(once.state_dict())
    x = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        y = once(x)
        assert y.shape == (2, 3, 32, 48)
        assert torch.equal(y, per_layer(x))


def test_partition_and_reverse_are_inverse():
    x = torch.randn(2, 5, 16, 24)
    p = partition(x, 8)
    assert p.shape == (12, 5, 8, 8)
    assert torch.equal(reverse(p, 8, 2, 16, 24), x)
    assert torch.equal(p[1], x[0, :, 0:8, 8:16])  # patches in row-major order


def test_norm_choices_and_bad_options():
    assert any(m.__class__.__name__ == "TanhNorm" for m in DITN(DITNConfig(norm="tanh")).modules())
    with pytest.raises(ValueError, match="norm"):
        DITN(DITNConfig(norm="batch"))
    with pytest.raises(ValueError, match="unfold"):
        DITN(DITNConfig(unfold="twice"))


def test_trained_weights_beat_bicubic_on_held_out_images():
    pytest.importorskip("skimage")
    from tools.quality.sr import evaluate

    model = load_trained()
    assert sum(p.numel() for p in model.parameters()) < 100_000  # small enough to commit
    quality = evaluate(model, 2)
    assert quality["model"]["mean"] > quality["bicubic"]["mean"] + 0.2, quality
