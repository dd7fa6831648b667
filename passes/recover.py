"""recover: label-free recovery of a pruned model (FX) by distillation from its own dense original.

The teacher is the model with every compressed weight put back to its ``original`` (the
compression state keeps it); the student is the pruned model. Both see the same calibration
inputs, augmented at every step (image inputs, 4-D float: a random horizontal flip, a random
shift of up to an eighth of the side with edge padding, brightness scaled by 0.8-1.2), and the
student minimises the KL divergence of its softened output distribution from the teacher's
(temperature T, scaled by T^2), the outputs read as logits. No labels are needed, so any
calibration images serve.

Every parameter trains (weights, biases, BatchNorm's affine terms; BatchNorm statistics are
frozen: the model stays in eval mode, small batches would corrupt them). ``mixup`` > 0 blends each
image with another of its batch (weight ~ Beta(mixup, mixup), the larger part first), so the
student also matches the teacher between the calibration images. Pruned weights stay zero:
their gradients are masked, and Adam leaves a weight whose gradient is always zero where it is.
The budget (steps, batch, seconds, first and last loss) goes into the report.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from effc.errors import InputError, PassOptionError
from effc.ir.sites import weight_sites
from effc.pass_base import Pass, PassResult
from effc.passes._train import train
from effc.registry import register


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flip, shift and brightness for a (B, C, H, W) batch (each sample its own draw)."""
    out = []
    for img in x:
        if float(torch.rand((), generator=g)) < 0.5:
            img = img.flip(-1)
        h, w = img.shape[-2:]
        dy, dx = (int(torch.randint(-s // 8, s // 8 + 1, (), generator=g)) for s in (h, w))
        pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))
        img = F.pad(img[None], pad, mode="replicate")[0]
        img = img[..., max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]
        out.append(img * (0.8 + 0.4 * float(torch.rand((), generator=g))))
    return torch.stack(out)


def _first_float(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if hasattr(outputs, "logits"):
        return outputs.logits
    return next(o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point())


@register
class Recover(Pass):
    """Distil the pruned model from its dense original on augmented calibration inputs."""

    name = "recover"
    kinds = ("fx",)
    lossy = True

    @dataclass
    class Options:
        steps: int = 200
        lr: float = 1e-4
        batch: int = 8
        temperature: float = 2.0
        augment: bool = True
        mixup: float = 0.0

    def needs_calibration(self) -> bool:
        return True

    def validate(self) -> None:
        o = self.options
        if o.steps < 1 or o.batch < 1 or o.lr <= 0 or o.temperature <= 0 or o.mixup < 0:
            raise PassOptionError(
                "pass 'recover': steps and batch must be >= 1, lr and temperature > 0, mixup >= 0"
            )

    def run(self, model, ctx) -> PassResult:
        o = self.options
        if not ctx.calibration:
            raise InputError(
                "pass 'recover' needs calibration inputs (--calib) and none were given"
            )
        student = model.module
        pruned = {
            s.fqn: (s, st)
            for s in weight_sites(model)
            if (st := model.compression.get(s.fqn)) is not None and st.original is not None
        }
        if not pruned:
            raise InputError(
                "pass 'recover' distils a compressed model from its original weights; no "
                "compressed weights are recorded (run kernel-sparsity or group-prune first)"
            )
        teacher = copy.deepcopy(student).eval()
        names = dict(student.named_parameters())
        t_params = dict(teacher.named_parameters())
        masks = {}
        for site, st in pruned.values():
            key = next((k for k, p in names.items() if p is site.handle), None)
            if key is None:
                continue
            with torch.no_grad():
                t_params[key].copy_(st.original.reshape(site.shape))
            if st.element_mask is not None:
                masks[key] = st.element_mask.reshape(site.shape).to(names[key].dtype)
            elif st.mask is not None:
                masks[key] = st.keep_mask().reshape(site.shape).to(names[key].dtype)
        keys = list(ctx.calibration[0])
        data = {k: torch.from_numpy(np.concatenate([s[k] for s in ctx.calibration])) for k in keys}
        images = [k for k, v in data.items() if v.dim() == 4 and v.is_floating_point()]
        n = next(iter(data.values())).shape[0]
        g = torch.Generator().manual_seed(ctx.seed)
        T = o.temperature

        def batch(step: int) -> dict:
            idx = torch.randint(0, n, (min(o.batch, n),), generator=g)
            out = {k: v[idx] for k, v in data.items()}
            if o.augment:
                for k in images:
                    out[k] = augment(out[k], g)
            if o.mixup > 0 and images:
                # function matching: blend each image with another of the batch, so the student
                # matches the teacher between the calibration images, not only on them
                b = out[images[0]].shape[0]
                lam = torch.distributions.Beta(o.mixup, o.mixup).sample((b,))
                lam = torch.maximum(lam, 1 - lam)  # the first image dominates
                perm = torch.randperm(b, generator=g)
                for k in images:
                    w = lam.view(-1, *([1] * (out[k].dim() - 1)))
                    out[k] = w * out[k] + (1 - w) * out[k][perm]
            return out

        def loss_of(step: int) -> torch.Tensor:
            x = batch(step)
            with torch.no_grad():
                target = _first_float(teacher(**x)).float() / T
            logits = _first_float(student(**x)).float() / T
            return F.kl_div(
                logits.log_softmax(-1),
                target.log_softmax(-1),
                log_target=True,
                reduction="batchmean",
            ) * (T * T)

        trainable = [p for p in student.parameters() if p.is_floating_point()]
        was = [p.requires_grad for p in trainable]
        hooks = []
        for key, mask in masks.items():
            hooks.append(names[key].register_hook(lambda grad, m=mask: grad * m))
        try:
            for p in trainable:
                p.requires_grad_(True)
            student.eval()
            torch.manual_seed(ctx.seed)
            log = train([{"params": trainable}], loss_of, o.steps, o.lr, label="recover")
        finally:
            for h in hooks:
                h.remove()
            for p, w in zip(trainable, was):
                p.requires_grad_(w)
        for key, mask in masks.items():  # exactly zero where pruned (also against fp drift)
            with torch.no_grad():
                names[key].mul_(mask)
        model.retrace()
        stats = {
            **log.budget(),
            "batch": min(o.batch, n),
            "samples": n,
            "augment": o.augment and bool(images),
            "mixup": o.mixup,
            "temperature": T,
            "masked_weights": len(masks),
        }
        return PassResult(model, True, stats)
