"""A small MobileNet-style CNN built in code: conv/BN/ReLU stem, depthwise-separable blocks,
global pooling and a linear classifier. The embedded default model of the CLI."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class TinyCNN(nn.Module):
    """Input ``pixels`` (batch, 3, 32, 32) -> logits (batch, num_classes)."""

    def __init__(self, num_classes: int = 10, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w, 3, 2),
            _conv_bn(w, w, 3, 1, groups=w),
            _conv_bn(w, 2 * w, 1),
            _conv_bn(2 * w, 2 * w, 3, 2, groups=2 * w),
            _conv_bn(2 * w, 4 * w, 1),
        )
        self.classifier = nn.Linear(4 * w, num_classes)
        self._randomize_bn()
        self.eval()

    def _randomize_bn(self) -> None:
        """Give BatchNorm non-trivial statistics so folding it is a real test."""
        g = torch.Generator().manual_seed(1)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.features(pixels)
        return self.classifier(x.mean(dim=(2, 3)))

    def example_inputs(self, batch: int = 1) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {"pixels": torch.randn(batch, 3, 32, 32, generator=g)}
