"""Calibration images without data: inputs synthesized from a network's own BatchNorm statistics
(``--calib synthetic``).

A trained network's BatchNorm layers remember the mean and variance of what they saw in training
(``running_mean``, ``running_var``). Inputs optimized so that every BatchNorm layer sees those
statistics on them look, to the network, like its training data (ZeroQ, Cai et al. 2020, "distilled
data"); a cross-entropy term towards a random class per image spreads them over the classifier's
classes, and a total-variation prior and small random shifts keep them image-like (DeepInversion,
Yin et al. 2020). For a classifier calibrated on a handful of photographs this replaces a biased
sample of one user's images by a sample shaped like the training set the model was fitted to.

Loss per batch (the module in eval mode, its weights frozen, the inputs the only parameters)::

    sum over BatchNorm layers of ||mean(x_l) - running_mean||_2 + ||std(x_l) - running_std||_2
      + ce * cross_entropy(logits, random targets)   (classifiers: a 2-D output)
      + tv * total variation of the input

where x_l is the layer's input batch, mean and std per channel over batch and pixels. Images are
first optimized at half resolution (``coarse`` of the steps; a quarter of the pixels, so most of
the work is cheap), then upsampled and refined at full size, with Adam and a cosine learning-rate
decay; each step shifts the batch by up to ``jitter`` pixels (cyclically) and flips it at random,
so no single pixel grid is fitted. The report of a run is returned beside the images: the
BatchNorm loss of random inputs and of the synthesized ones, the steps and seconds.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from effc.errors import InputError, UnsupportedError
from effc.progress import bar


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that hold running statistics, in module order."""
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.running_mean is not None
        and m.running_var is not None
    ]


class _Statistics:
    """Forward hooks that add each BatchNorm input's distance from its running statistics."""

    def __init__(self, layers):
        self.layers, self.loss, self.handles = layers, None, []

    def __enter__(self) -> _Statistics:
        for m in self.layers:
            self.handles.append(m.register_forward_pre_hook(self._hook(m)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, m):
        def fn(module, args):
            x = args[0].transpose(0, 1).reshape(args[0].shape[1], -1)
            mean, var = x.mean(1), x.var(1, unbiased=False)
            d = torch.linalg.vector_norm(mean - m.running_mean) + torch.linalg.vector_norm(
                (var + m.eps).sqrt() - (m.running_var + m.eps).sqrt()
            )
            self.loss = d if self.loss is None else self.loss + d

        return fn

    def take(self) -> torch.Tensor:
        loss, self.loss = self.loss, None
        return loss


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean()


def _logits(out) -> torch.Tensor | None:
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] > 1 else None


def synthesize(
    module: nn.Module,
    shape: tuple[int, int, int],
    count: int,
    steps: int = 200,
    batch: int = 16,
    lr: float = 0.1,
    ce: float = 0.05,
    tv: float = 1e-2,
    jitter: int = 4,
    coarse: float = 0.75,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """``count`` inputs of ``shape`` (C, H, W) for ``module`` as float32 (count, C, H, W), and a
    report. The module is left as it was (mode, gradients)."""
    layers = batchnorms(module)
    if not layers:
        raise UnsupportedError(
            "--calib synthetic matches the statistics of the model's BatchNorm layers; the model "
            "has none (give calibration images or an .npz instead)"
        )
    if count < 1 or steps < 1 or batch < 1 or not 0.0 <= coarse < 1.0:
        raise InputError(
            f"synthetic calibration needs count, steps and batch >= 1 and 0 <= coarse < 1, got "
            f"count={count}, steps={steps}, batch={batch}, coarse={coarse}"
        )
    c, h, w = shape
    was_training = module.training
    grads = [p.requires_grad for p in module.parameters()]
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    out = np.empty((count, c, h, w), np.float32)
    report = {
        "method": "batchnorm statistics (ZeroQ / DeepInversion)",
        "batchnorm_layers": len(layers),
    }
    start_loss = end_loss = 0.0
    t0 = time.perf_counter()
    batches = math.ceil(count / batch)
    small = (max(8, h // 2), max(8, w // 2)) if coarse else (h, w)  # the coarse phase's size
    first = round(steps * coarse)  # its steps
    progress, task = bar(batches * steps, "synthesizing calibration inputs")
    try:
        with progress, _Statistics(layers) as stats, torch.enable_grad():
            for b in range(batches):
                n = min(batch, count - b * batch)
                x = torch.randn(n, c, *small, generator=g).requires_grad_(True)
                targets = None
                for phase, length in (("coarse", first), ("fine", steps - first)):
                    if length == 0:
                        continue
                    if phase == "fine" and tuple(x.shape[2:]) != (h, w):
                        x = F.interpolate(x.detach(), (h, w), mode="bilinear").requires_grad_(True)
                    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9))
                    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(length, 1))
                    for step in range(length):
                        dy, dx = (
                            int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g)
                        )
                        view = torch.roll(x, (dy, dx), (2, 3)) if jitter else x
                        if float(torch.rand((), generator=g)) < 0.5:
                            view = view.flip(3)
                        logits = _logits(module(view))
                        bn = stats.take()
                        loss = bn + tv * total_variation(x)
                        if logits is not None and ce > 0:
                            if targets is None:
                                targets = torch.randint(0, logits.shape[1], (n,), generator=g)
                            loss = loss + ce * F.cross_entropy(logits, targets)
                        if step == 0 and (phase == "coarse" or not first):
                            start_loss += float(bn.detach()) * n
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                        progress.advance(task)
                with torch.no_grad():
                    module(x)
                    end_loss += float(stats.take()) * n
                out[b * batch : b * batch + n] = x.detach().numpy()
    finally:
        module.train(was_training)
        for p, r in zip(module.parameters(), grads):
            p.requires_grad_(r)
    if not np.isfinite(out).all():
        raise InputError("synthetic calibration diverged (non-finite inputs); lower its lr")
    report.update(
        count=count,
        steps=steps,
        batch=batch,
        batchnorm_loss_random=round(start_loss / count, 4),
        batchnorm_loss_synthetic=round(end_loss / count, 4),
        seconds=round(time.perf_counter() - t0, 1),
    )
    return out, report
