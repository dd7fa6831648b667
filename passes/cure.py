"""cure: FoldGPT's short fine-tune after depth compression. The model that ``remove-blocks`` /
``share-blocks`` changed learns from the model as it was before them (the teacher they keep):
KL divergence of the next-token distributions (``distill=logits``; an encoder such as BERT has
no logits, so there its output hidden states are matched, by mean squared error over the
teacher's mean square), and/or the mean squared
error between the hidden states leaving the student's last ``layers`` blocks and the teacher's
last ``layers`` blocks (``distill=tail``, normalised by the teacher's mean square), or both.

What trains: every norm weight and linear bias of the blocks (each block keeps its own, shared
or not) and
either the blocks' linear weights (``lora_rank=0``, full fine-tune; a shared Parameter trains
once, its gradient summed over the blocks that read it) or a rank-r LoRA adapter per distinct
weight (``lora_rank=r``; one adapter per shared weight, merged into it afterwards, so sharing
survives). Embeddings and lm_head stay frozen. Progress bar, seed, and the budget (steps, lr,
seconds, losses before and after) in the report. FX only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from effc.errors import PassOptionError, UnsupportedError
from effc.ir.blocks import block_layers
from effc.pass_base import Pass, PassResult
from effc.passes._train import hidden_state, output_distance, relative_mse, train
from effc.registry import register


class _LoRA(nn.Module):
    """x -> x Wᵀ + b + x Aᵀ Bᵀ * scale, one (A, B) per distinct weight (shared by its users)."""

    def __init__(self, linear: nn.Linear, a: nn.Parameter, b: nn.Parameter, scale: float):
        super().__init__()
        self.linear, self.a, self.b, self.scale = linear, a, b, scale

    def forward(self, x):
        return self.linear(x) + (x @ self.a.t() @ self.b.t()) * self.scale


@register
class Cure(Pass):
    """Fine-tune after block removal/sharing, distilling from the model before them."""

    name = "cure"
    kinds = ("fx",)
    lossy = True
    wants_teacher = True

    @dataclass
    class Options:
        steps: int = 32
        lr: float = 1e-4
        samples: int = 8
        distill: Literal["tail", "logits", "both"] = "both"
        layers: int = 2  # tail blocks whose output hidden states are matched
        lora_rank: int = 0  # 0: full fine-tune of the blocks' linear weights
        alpha: float = 1.0  # weight of the tail term against the logits term

    def needs_calibration(self) -> bool:
        return True

    def validate(self) -> None:
        o = self.options
        if o.steps < 1 or o.samples < 1 or o.lr <= 0 or o.layers < 1 or o.lora_rank < 0:
            raise PassOptionError(
                "pass 'cure': need steps, samples, layers >= 1, lr > 0 and lora_rank >= 0"
            )

    def requires(self, model, ctx) -> None:
        super().requires(model, ctx)
        if getattr(model, "teacher", None) is None:
            raise UnsupportedError(
                "pass 'cure' distills from the model before remove-blocks/share-blocks: run one "
                "of them first in the same pipeline"
            )
        compressed = [f for f, s in model.compression.sites.items() if s.compressed]
        if compressed:
            raise UnsupportedError(
                f"pass 'cure': {compressed[0]} is compressed; cure before pruning or quantizing "
                "(gqsa-train trains compressed weights)"
            )
        block_layers(model, self.name, every_block=False)

    def run(self, model, ctx) -> PassResult:
        o = self.options
        torch.manual_seed(ctx.seed)
        module, teacher = model.module, model.teacher
        container, student_blocks, _ = block_layers(model, self.name, every_block=False)
        teacher_blocks = teacher.get_submodule(container)  # the model before removal/sharing
        tail = min(o.layers, len(student_blocks))
        data = ctx.calibration[: o.samples]

        # what trains
        frozen = [(p, p.requires_grad) for p in module.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        norms = {
            id(p): p
            for name, p in student_blocks.named_parameters()
            if "norm" in name.lower() and p.dim() == 1
        }
        swapped: list[tuple[nn.Module, str, nn.Linear]] = []
        adapters: dict[int, tuple[nn.Parameter, nn.Parameter, nn.Parameter]] = {}
        trained: dict[int, nn.Parameter] = dict(norms)
        for block in student_blocks:
            for name, lin in list(block.named_modules()):
                if not isinstance(lin, nn.Linear):
                    continue
                if lin.bias is not None:  # per block, as the norms (share-blocks keeps them)
                    trained[id(lin.bias)] = lin.bias
                if o.lora_rank == 0:
                    trained[id(lin.weight)] = lin.weight
                    continue
                key = id(lin.weight)
                if key not in adapters:
                    r = min(o.lora_rank, *lin.weight.shape)
                    a = nn.Parameter(torch.randn(r, lin.in_features) / lin.in_features**0.5)
                    b = nn.Parameter(torch.zeros(lin.out_features, r))
                    adapters[key] = (lin.weight, a, b)
                _, a, b = adapters[key]
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, attr, _LoRA(lin, a, b, 1.0))
                swapped.append((parent, attr, lin))
        params = list(trained.values()) + [t for _, a, b in adapters.values() for t in (a, b)]
        for p in params:
            p.requires_grad_(True)

        captured: dict[str, list] = {"student": [], "teacher": []}

        def capture(which):
            def fn(block, args, kwargs, output):
                captured[which].append(hidden_state(output))

            return fn

        handles = [
            b.register_forward_hook(capture("student"), with_kwargs=True)
            for b in list(student_blocks)[-tail:]
        ] + [
            b.register_forward_hook(capture("teacher"), with_kwargs=True)
            for b in list(teacher_blocks)[-tail:]
        ]
        parts: dict[str, list[float]] = {"logits": [], "tail": []}

        def loss_of(step: int) -> torch.Tensor:
            x = {k: torch.from_numpy(np.asarray(v)) for k, v in data[step % len(data)].items()}
            captured["student"].clear()
            captured["teacher"].clear()
            with torch.no_grad():
                target = teacher(**x)
            output = module(**x)
            loss = torch.zeros(())
            if o.distill in ("logits", "both"):
                kl = output_distance(output, target)
                parts["logits"].append(float(kl.detach()))
                loss = loss + kl
            if o.distill in ("tail", "both"):
                mse = sum(
                    relative_mse(s, t) for s, t in zip(captured["student"], captured["teacher"])
                ) / max(tail, 1)
                parts["tail"].append(float(mse.detach()))
                loss = loss + o.alpha * mse
            return loss

        try:
            with model.plain_outputs():
                log = train([{"params": params}], loss_of, o.steps, o.lr, label="cure")
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():  # adapters merged into their (possibly shared) weights
                for weight, a, b in adapters.values():
                    weight.add_(b @ a)
            for parent, attr, lin in swapped:
                setattr(parent, attr, lin)
            for p, was in frozen:
                p.requires_grad_(was)
        model.retrace()

        def first_last(values):
            return (values[0], sum(values[-4:]) / len(values[-4:])) if values else (None, None)

        stats = {
            "distill": o.distill,
            "tail_layers": tail,
            "lora_rank": o.lora_rank,
            "trained_parameters": sum(p.numel() for p in params),
            **log.budget(),
        }
        for key in ("logits", "tail"):
            first, last = first_last(parts[key])
            if first is not None:
                stats[f"{key}_loss_first"], stats[f"{key}_loss_last"] = first, last
        return PassResult(model, True, stats)
