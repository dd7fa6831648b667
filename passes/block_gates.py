"""block-gates: FoldGPT's learnable block gates. Every transformer block gets one scalar gate g
on its contribution to the residual stream, ``y = x + g * (block(x) - x)``; the gates are trained
jointly (every weight frozen) on calibration text, so the ranking they give models the coupling
between blocks that one-at-a-time scores (``remove-blocks{score=cosine}``) cannot see.

Loss: next-token cross-entropy of the gated model (``loss=lm``) or its distance from the ungated
model (``loss=kd``: KL divergence of the next-token distributions; for an encoder such as BERT,
which has no logits, the mean squared error of the output hidden states over the ungated one's
mean square); ``loss=auto`` (default) is ``lm`` for a language model and ``kd`` for an encoder;
plus a polarizing regulariser ``lam * (t * sum|g| - sum|g - mean g|)``
(Zhuang et al. 2020: it drives some gates to 0 and keeps the others up, instead of shrinking all
alike) and a budget term ``budget * (mean g - (1 - rate))^2`` that pulls the total gate mass to the
blocks kept at removal rate ``rate`` (blocks have equal FLOPs, so this is the FLOPs constraint).
Gates are clipped to [0, 1] after every step (projected Adam). The gates are recorded in the compression state
(``remove-blocks{score=gates}`` reads them) and reported with the ranking; the model itself is
left unchanged (the gates are not applied).
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
from effc.passes._train import (
    hidden_state,
    model_output,
    output_distance,
    resolve_loss,
    train,
)
from effc.registry import register


@register
class BlockGates(Pass):
    """Learn one gate per transformer block (weights frozen) to rank blocks for removal."""

    name = "block-gates"
    kinds = ("fx",)

    @dataclass
    class Options:
        steps: int = 32
        lr: float = 0.05
        samples: int = 8
        rate: float = 0.2  # the removal rate the budget term aims at
        lam: float = 0.01  # polarizing regulariser weight
        t: float = 1.2  # its balance (> 1: shrink overall; the - |g - mean| term polarizes)
        budget: float = 1.0  # weight of the gate-mass (FLOPs) term
        loss: Literal["auto", "lm", "kd"] = "auto"

    def needs_calibration(self) -> bool:
        return True

    def validate(self) -> None:
        o = self.options
        if o.steps < 1 or o.samples < 1 or o.lr <= 0:
            raise PassOptionError(
                f"pass 'block-gates': need steps >= 1, samples >= 1 and lr > 0, got steps="
                f"{o.steps}, samples={o.samples}, lr={o.lr}"
            )
        if not 0 < o.rate < 1 or o.lam < 0 or o.budget < 0:
            raise PassOptionError(
                f"pass 'block-gates': need 0 < rate < 1 and lam, budget >= 0, got rate={o.rate}, "
                f"lam={o.lam}, budget={o.budget}"
            )

    def requires(self, model, ctx) -> None:
        super().requires(model, ctx)
        block_layers(model, self.name, every_block=False)
        if any("input_ids" not in x for x in ctx.calibration):
            raise UnsupportedError(
                "pass 'block-gates' trains on text: the calibration samples need input_ids"
            )

    def run(self, model, ctx) -> PassResult:
        o = self.options
        torch.manual_seed(ctx.seed)
        container, layers, _ = block_layers(model, self.name, every_block=False)
        module = model.module
        n = len(layers)
        gates = nn.Parameter(torch.ones(n))
        state = {"on": True}

        def hook(i):
            def fn(block, args, kwargs, output):
                if not state["on"]:
                    return None
                x = hidden_state(args[0] if args else kwargs.get("hidden_states"))
                y = hidden_state(output)
                if x is None or y is None or x.shape != y.shape:
                    return None
                gated = x + gates[i] * (y - x)
                return gated if isinstance(output, torch.Tensor) else (gated, *output[1:])

            return fn

        data = ctx.calibration[: o.samples]
        with model.plain_outputs():  # before the gates hook in: the model as it is
            kind = resolve_loss(module, data[0], o.loss, self.name)
        frozen = [(p, p.requires_grad) for p in module.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(layers)]
        task_loss: list[float] = []

        def loss_of(step: int) -> torch.Tensor:
            clip()  # after the previous step
            x = {k: torch.from_numpy(np.asarray(v)) for k, v in data[step % len(data)].items()}
            output = module(**x)
            if kind == "kd":
                state["on"] = False
                with torch.no_grad():
                    target = module(**x)
                state["on"] = True
                task = output_distance(output, target)
            else:
                logits = model_output(output)[0][:, :-1]
                task = nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), x["input_ids"][:, 1:].reshape(-1)
                )
            task_loss.append(float(task.detach()))
            g = gates
            polar = o.t * g.abs().sum() - (g - g.mean()).abs().sum()
            mass = (g.mean() - (1 - o.rate)) ** 2
            return task + o.lam * polar + o.budget * mass

        def clip() -> None:  # projected steps: the gates stay in [0, 1]
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)

        try:
            with model.plain_outputs():
                log = train([{"params": [gates]}], loss_of, o.steps, o.lr, label="block-gates")
        finally:
            for h in handles:
                h.remove()
            for p, was in frozen:
                p.requires_grad_(was)
        clip()
        values = [float(v) for v in gates.detach()]
        for i, v in enumerate(values):
            model.compression.block(f"{container}.{i}").gate = v
        ranking = sorted(range(n), key=lambda i: values[i])
        stats = {
            "gates": [round(v, 4) for v in values],
            "ranking_weakest_first": ranking,
            "loss": kind,
            f"{kind}_loss_first": task_loss[0],
            f"{kind}_loss_last": sum(task_loss[-4:]) / len(task_loss[-4:]),
            **log.budget(),
        }
        return PassResult(model, False, stats)
