import json

import numpy as np
import pytest
import torch
from torch import nn

import effc.ir
from effc import calibration
from effc.errors import InputError, UnsupportedError
from effc.ir.onnx_io import save_onnx
from effc.ir.torch_io import export_onnx
from effc.models import TinyCNN
from effc.synthetic import _Statistics, batchnorms, synthesize


def trained_bn_net(seed=0) -> nn.Module:
    """A conv/BN net whose BatchNorm layers saw inputs of mean 1.5 and std 2 per pixel (set by
    train-mode passes), so the statistics synthesis must reach are known and far from N(0, 1)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.BatchNorm2d(3, momentum=None),
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    net.train()
    with torch.no_grad():
        for _ in range(20):
            net(1.5 + 2.0 * torch.randn(16, 3, 16, 16))
    return net.eval()


def bn_loss(net, x) -> float:
    with _Statistics(batchnorms(net)) as stats, torch.no_grad():
        net(torch.from_numpy(x))
        return float(stats.take())


def test_synthesized_inputs_match_the_batchnorm_statistics():
    net = trained_bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, report = synthesize(net, (3, 16, 16), 8, steps=150, batch=8, jitter=1, tv=0.0)
    assert x.shape == (8, 3, 16, 16) and x.dtype == np.float32
    random = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    # the statistics the first BatchNorm remembers (mean 1.5, std 2) are reached from N(0, 1)
    assert abs(x.mean() - 1.5) < 0.2 and abs(x.std() - 2.0) < 0.3
    assert bn_loss(net, x) < 0.2 * bn_loss(net, random)
    assert report["batchnorm_loss_synthetic"] < 0.2 * report["batchnorm_loss_random"]
    assert report["batchnorm_layers"] == 3 and report["count"] == 8
    # the model is left as it was: eval mode, weights and running statistics unchanged
    assert not net.training and all(p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_seeded_and_spread_over_classes():
    net = trained_bn_net()
    a, _ = synthesize(net, (3, 16, 16), 4, steps=10, batch=2, seed=3)
    b, _ = synthesize(net, (3, 16, 16), 4, steps=10, batch=2, seed=3)
    c, _ = synthesize(net, (3, 16, 16), 4, steps=10, batch=2, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # the cross-entropy term pulls each image towards its own random class
    x, _ = synthesize(net, (3, 16, 16), 16, steps=100, batch=16, ce=1.0)
    with torch.no_grad():
        classes = net(torch.from_numpy(x)).argmax(1)
    assert len(set(classes.tolist())) >= 3


def test_a_model_without_batchnorm_or_bad_options_is_a_clear_error():
    with pytest.raises(UnsupportedError, match="has none"):
        synthesize(nn.Sequential(nn.Conv2d(3, 4, 3)), (3, 8, 8), 2)
    with pytest.raises(Exception, match="count, steps and batch"):
        synthesize(trained_bn_net(), (3, 8, 8), 0)


@pytest.mark.parametrize("source,synthesized", [("synthetic", 4), ("images+synthetic", 2)])
def test_cli_calibrates_on_synthesized_images(tmp_path, cli, source, synthesized):
    if source.startswith("images"):
        pytest.importorskip("skimage")
    out = tmp_path / "out"
    code, _, stderr = cli(
        "compile",
        "builtin:tiny-cnn",
        "--passes",
        "kernel-sparsity{sparsity=0.3,score=obs}",
        "--calib",
        source,
        "--calib-samples",
        "4",
        "-o",
        str(out),
    )
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    made = report["calibration"]["synthesized"]
    assert report["calibration"]["samples"] == 4 and made["count"] == synthesized
    assert made["batchnorm_loss_synthetic"] < made["batchnorm_loss_random"]


def test_mixed_sources_split_the_samples_and_refuse_one():
    pytest.importorskip("skimage")
    model = effc.ir.FxModel(TinyCNN().eval(), TinyCNN().example_inputs())
    data, info = calibration.load("images+synthetic", model, samples=6)
    assert len(data) == 6 and info["synthesized"]["count"] == 3 and info["samples"] == 6
    photos = calibration.load("images", model, samples=3)[0]
    for a, b in zip(data[:3], photos):  # the photographs first, then the synthesized images
        assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="2 or more"):
        calibration.load("images+synthetic", model, samples=1)


def test_cli_refuses_synthesis_for_an_onnx_file_or_a_model_without_images(tmp_path, cli):
    onnx = tmp_path / "cnn.onnx"
    model = TinyCNN().eval()
    save_onnx(export_onnx(model, model.example_inputs()), onnx)
    code, _, stderr = cli(
        "compile",
        str(onnx),
        "--passes",
        "cleanup",
        "--calib",
        "synthetic",
        "-o",
        str(tmp_path / "bad"),
    )
    assert code == 2 and "needs a torch model" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "bad").exists()
    code, _, stderr = cli(
        "compile",
        "builtin:tiny-llama",
        "--passes",
        "cleanup",
        "--calib",
        "synthetic",
        "-o",
        str(tmp_path / "bad2"),
    )
    assert code == 2 and "--calib synthetic feeds one image input" in stderr
