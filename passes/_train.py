"""One training loop for every pass that trains (gqsa-train's stages, layernorm's tanh
distillation, and the block-gate and cure training of later passes): Adam over parameter groups,
an optional cosine-annealed learning rate, a progress bar, and the budget it spent (steps, lr,
seconds, first and last loss) for the report. Callers seed torch (``ctx.seed``) before."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from effc.distributed import sum_, world
from effc.errors import UnsupportedError
from effc.progress import bar


@dataclass
class TrainLog:
    losses: list[float]
    lr: float
    seconds: float

    def budget(self) -> dict:
        """What the report records of a training run."""
        tail = self.losses[-10:]
        return {
            "steps": len(self.losses),
            "lr": self.lr,
            "seconds": round(self.seconds, 2),
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": sum(tail) / len(tail) if tail else None,
        }


def train(
    groups: list[dict],
    loss_of: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    cosine: bool = True,
    advance: Callable[[], None] | None = None,
    label: str = "training",
    data_parallel: bool = False,
) -> TrainLog:
    """Minimise ``loss_of(step)`` for ``steps`` Adam steps over ``groups`` (torch parameter
    groups, each may set its own ``lr``). ``advance`` ticks a caller's progress bar after each
    step; without one the loop shows its own bar named ``label``.

    ``data_parallel``: under torch.distributed, ``loss_of`` gives this process's part of the
    step's loss (its share of the step's samples); the gradients and the loss are summed over
    the processes (one ``all_reduce`` of all gradients, flattened in parameter order, per step)
    before Adam steps, so every process takes the same step."""
    # the fused Adam: one pass over each parameter and its moments per step (13x faster than the
    # per-op loop on a 50M-parameter tensor here; the same update up to float rounding)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )
    opt = torch.optim.Adam(groups, lr=lr, fused=fused or None)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    own = None
    if advance is None:
        own, task = bar(steps, label)
        own.start()
        advance = lambda: own.advance(task)  # noqa: E731
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        with torch.enable_grad():
            for step in range(steps):
                loss = loss_of(step)
                opt.zero_grad()
                loss.backward()
                if data_parallel and world()[1] > 1:
                    loss = _all_reduce_grads(params, loss)
                opt.step()
                if schedule is not None:
                    schedule.step()
                losses.append(float(loss.detach()))
                advance()
    finally:
        if own is not None:
            own.stop()
    return TrainLog(losses, lr, time.perf_counter() - t0)


def _all_reduce_grads(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Sum every parameter's gradient and the loss over the processes in one all_reduce (a
    parameter without a gradient on this process counts as zeros); returns the summed loss."""
    params = [p for p in params if p.requires_grad]
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        + [loss.detach().reshape(1).to(params[0].dtype)]
    )
    sum_(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
    return flat[-1]


def keep_teacher(model, ctx) -> None:
    """Keep a frozen copy of an FX model's module as it is now, as ``model.teacher`` (once: the
    first structural pass of a pipeline keeps the original), where a later pass distills from it
    (``ctx.keep_teacher``, set by the pipeline for ``cure``)."""
    if not ctx.keep_teacher or getattr(model, "teacher", None) is not None:
        return
    teacher = copy.deepcopy(model.module).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    config = getattr(teacher, "config", None)
    if getattr(config, "use_cache", None):
        config.use_cache = False  # it only ever runs whole sequences, as effc runs models
    model.teacher = teacher


def hidden_state(value) -> torch.Tensor | None:
    """The hidden-state tensor of a transformer block's input or output (HF layers return a
    tensor or a tuple whose first item it is)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def logits_of(out) -> torch.Tensor:
    """The logits of a model's output (an HF output object, or the tensor itself)."""
    return getattr(out, "logits", out)


def model_output(out) -> tuple[torch.Tensor, bool]:
    """(tensor, is_logits) of a model's output: a language model's next-token logits (an HF
    output's ``logits``, or a plain tensor), or an encoder's output hidden states (BERT's
    ``last_hidden_state``), which have no vocabulary to distil over."""
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits, True
    if isinstance(out, torch.Tensor):
        return out, True
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = hidden_state(out)
    if hidden is None:
        raise TypeError(f"no logits or hidden states in a model output of type {type(out)}")
    return hidden, False


def resolve_loss(module, sample: dict, asked: str, what: str) -> str:
    """The loss a training pass uses: ``asked``, or for ``auto`` ``lm`` where the model has
    next-token logits and ``kd`` where it has none (an encoder), from one no-grad forward of
    ``sample``. ``lm`` on an encoder is a one-line error, before any training."""
    with torch.no_grad():
        x = {k: torch.from_numpy(np.asarray(v)) for k, v in sample.items()}
        has_logits = model_output(module(**x))[1]
    kind = asked if asked != "auto" else "lm" if has_logits else "kd"
    if kind == "lm" and not has_logits:
        raise UnsupportedError(
            f"pass '{what}': loss=lm needs next-token logits and this model (an encoder) has "
            "none; use loss=kd"
        )
    return kind


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the teacher's mean square (no gradient through the teacher)."""
    t = teacher.detach()
    return ((student - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12)


def next_token_loss(out, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a language model's output on the next token of ``input_ids``."""
    logits = model_output(out)[0][:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)
    )


def output_distance(student_out, teacher_out) -> torch.Tensor:
    """How far a model's output is from its teacher's: the KL divergence of the next-token
    distributions (every position but the last) where the outputs are logits; for an encoder,
    the mean squared error of the output hidden states over the teacher's mean square."""
    s, is_logits = model_output(student_out)
    t = model_output(teacher_out)[0].detach()
    if not is_logits:
        return relative_mse(s, t)
    s, t = s[:, :-1], t[:, :-1]
    return torch.nn.functional.kl_div(
        s.reshape(-1, s.shape[-1]).log_softmax(-1),
        t.reshape(-1, t.shape[-1]).log_softmax(-1),
        log_target=True,
        reduction="batchmean",
    )
