"""gqsa-train: GQSA's two-stage sparsity-aware training (FX only: it needs torch autograd).

stage=bqpo (block-wise quantization-pruning optimisation): for each transformer block in order,
on calibration activations, learn the kept weights and the per-group scales of every compressed
linear so the compressed block reproduces the original block:
    minimise || B_orig(h) - B_q(h) ||^2,   B_q's weights  w = s * (clamp(round(W / s) + z) - z) * mask
with straight-through rounding and the masks fixed (Adam, cosine-annealed learning rate per block;
the scales may take their own ``scale_lr``; each step the mean loss of ``batch`` samples, which
``torchrun`` processes split between them, their gradients summed by one all_reduce per step, so
every process takes the one-process step up to float order). The block inputs h come from the
already compressed blocks before it (errors do not pile up unseen). The targets come from the
original blocks (the ``original`` weights recorded by group-prune / quantize): with
``target=local`` the original block on the same inputs (each block mimics its original), with
``target=model`` the original model's own hidden state after that block (each block also undoes
the drift of the compressed blocks before it). Compressed sites outside the blocks (lm_head) are
trained last, when ``tail=true``: their inputs from the compressed model, their targets the
original layer on the original model's inputs, matched in squared error (``tail_loss=mse``) or,
their outputs read as logits, in the KL divergence of the next-token distributions
(``tail_loss=kd``: a logit error then costs in proportion to its token's probability, as in
perplexity; the right loss for an lm_head whose rows were pruned by that weight, group-prune's
``logit_weight``).

Blocks that share weights (share-blocks, FoldGPT) are trained group by group: a group is one
unit whose loss is the mean of its blocks' squared errors (each block after the first on the
output of the one before as it is now, against its own original on that input), so a shared
weight is trained once against every block that reads it, not block by block with the last
writer winning; each block keeps its own norms.

stage=e2e (E2E-OQP): weights, codes and masks frozen; only the per-group scales are trained end to
end on the calibration tokens, with ``loss=lm`` on the next-token loss (the paper's), with
``loss=kd`` on the KL divergence from the original model's next-token distribution (a teacher
copy of the model with the original weights back in; every token then carries a whole
distribution, not one label, which matters when calibration data is small). An encoder (BERT)
has no next-token logits: there ``loss=kd`` matches the original model's output hidden states
(mean squared error over their mean square) and ``loss=auto``, the default, picks it (``lm`` for
a language model). ``norms=true`` also
trains the norm layers' weights (RMSNorm / LayerNorm gains: a few thousand fp32 numbers the
compressed model keeps as they are), beyond the paper's E2E-OQP. ``weight_lr > 0`` also trains
the kept weights end to end at that learning rate (straight-through rounding as in bqpo, so codes
may change; masks stay fixed; codes round on the starting scales, which the trained scales then
multiply): quantization-aware sparse fine-tuning, beyond the paper too. ``holdout=N`` keeps the
last N calibration samples out of training and checks the loss on them before training, every
steps/8 steps and after; the trained parameters end at the check where it was lowest (never
worse on them than where the stage started), and the report lists every check. With few
calibration samples E2E-OQP can fit them at the held-out text's expense (on all-MiniLM-L6-v2, 200
steps on 32 windows took the embeddings' cosine to fp32 from 0.988 down to 0.903).

Both write the final codes and fp16 scales back into the compression state (so the BSR packer stores
exactly what was trained) and the dequantized weights into the model, and report the budget
(samples, tokens, steps, learning rate) and the loss before and after.

Pruned sites without quantization (2:4 from nm-prune, or groups from group-prune alone) train
their kept weights in bqpo under a fixed element mask, so the baselines can get the same budget.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from effc.distributed import world
from effc.errors import InputError, PassOptionError, UnsupportedError
from effc.ir.blocks import Block, find_blocks
from effc.ir.calibrate import block_output, capture_block_inputs
from effc.ir.compression import SiteState
from effc.pass_base import Pass, PassResult
from effc.passes._train import logits_of, model_output, output_distance, resolve_loss, train
from effc.progress import bar
from effc.registry import register

log = logging.getLogger(__name__)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class _FakeQuant(torch.autograd.Function):
    """scale * (clamp(round(w / step) + zero, 0, qmax) - zero) * mask over (out, groups, g)
    weights, with straight-through rounding: the same value and gradients as that expression
    under autograd (``round_ste``, clamp passing the gradient inside [0, qmax]), in a few passes
    over the weight instead of one per operation and its saved intermediates (BQPO on a
    LLaMA-7B block spent most of each step there). ``step`` None: the step is ``scale`` itself,
    which then also gets the gradient through the rounding."""

    @staticmethod
    def forward(ctx, w, scale, step, zero, mask, qmax):
        div = (scale if step is None else step)[..., None]
        centered = torch.round(w / div).add_(zero[..., None])
        inside = (centered >= 0) & (centered <= qmax)
        centered.clamp_(0, qmax).sub_(zero[..., None])  # code - zero
        ctx.save_for_backward(w, scale, step, mask, centered, inside)
        return centered * (scale * mask)[..., None]

    @staticmethod
    def backward(ctx, g):
        w, scale, step, mask, centered, inside = ctx.saved_tensors
        div = (scale if step is None else step)[..., None]
        through = g * (scale * mask)[..., None]  # d out / d code, times g
        through.mul_(inside)
        grad_scale = (g * centered).sum(-1).mul_(mask)
        if step is None:  # d code / d scale = -w / scale^2 (straight through)
            grad_scale.sub_((through * w).sum(-1) / (scale * scale))
        return through.div_(div), grad_scale, None, None, None, None


class FakeQuantLinear(nn.Module):
    """A linear layer whose weight is fake-quantized from trainable ``weight`` and ``scale``."""

    def __init__(self, linear: nn.Linear, state: SiteState, train_weight: bool, grid: bool = False):
        super().__init__()
        self.group, self.bits = state.group, state.bits
        out, inp = linear.weight.shape
        self.register_buffer("mask", state.group_mask().float())
        self.register_buffer("zero", state.zero.float())
        self.scale = nn.Parameter(state.scale.float().clone())
        self.shape, self.train_weight = (out, inp), train_weight
        if train_weight:
            # Training starts from the weights the model carries (their rounding gives back the
            # codes), so what error-compensating passes (GPTQ, OBS pruning) achieved is kept.
            start = state.scale[..., None] * (state.codes.float() - state.zero.float()[..., None])
            self.weight = nn.Parameter(start.reshape(out, inp).float().clone())
            if grid:  # e2e with weight_lr: codes round on the starting scales (a fixed grid),
                # and the trained scales only multiply them; rounding on the moving scales flipped
                # codes wholesale as they moved (SmolLM2, weight_lr 1e-5: perplexity 421 -> 83,335)
                self.register_buffer("grid", state.scale.float().clone())
        else:  # E2E-OQP: codes are fixed; only the scales move (no weight copy is kept)
            self.register_buffer("codes", state.codes.to(torch.uint8))
            # (code - zero) * mask, once: each step then dequantizes with one multiply (the same
            # numbers as the three-step form: the mask's 0/1 and integer differences are exact)
            self.register_buffer(
                "centered",
                (self.codes.float() - self.zero[..., None]) * self.mask[..., None],
            )
        self.bias = linear.bias

    def codes_now(self) -> torch.Tensor:
        if not self.train_weight:
            return self.codes.float()
        out, inp = self.shape
        w = self.weight.view(out, inp // self.group, self.group)
        step = self.grid if hasattr(self, "grid") else self.scale
        return torch.clamp(
            round_ste(w / step[..., None]) + self.zero[..., None], 0, 2**self.bits - 1
        )

    def dequantized(self) -> torch.Tensor:
        if not self.train_weight:
            return (self.scale[..., None] * self.centered).reshape(self.shape)
        out, inp = self.shape
        w = self.weight.view(out, inp // self.group, self.group)
        grid = getattr(self, "grid", None)
        qmax = 2**self.bits - 1
        return _FakeQuant.apply(w, self.scale, grid, self.zero, self.mask, qmax).reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized(), self.bias)

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final (codes uint8, fp16-exact scale, dequantized weight)."""
        self.scale.data = self.scale.data.abs().clamp_min(1e-8).half().float()
        self.scale.data[self.scale.data == 0] = 1.0
        codes = self.codes_now().round()
        return codes.to(torch.uint8), self.scale.data.clone(), self.dequantized()


class MaskedLinear(nn.Module):
    """A pruned, unquantized linear layer (N:M, or groups without quantize): trainable kept
    weights, the zeros held by a fixed element mask."""

    def __init__(self, linear: nn.Linear, state: SiteState):
        super().__init__()
        self.register_buffer("mask", state.keep_mask().float())
        self.weight = nn.Parameter(linear.weight.detach().clone() * self.mask)
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized(), self.bias)


def _swap(root: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    parent, _, leaf = fqn.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    old = getattr(owner, leaf)
    setattr(owner, leaf, new)
    return old


def _readers(root: nn.Module, linear: nn.Linear) -> list[tuple[str, nn.Module]]:
    """Every linear layer reading ``linear``'s weight (blocks sharing parameters), with itself."""
    return [
        (n, m)
        for n, m in root.named_modules()
        if isinstance(m, nn.Linear) and m.weight is linear.weight
    ]


def _swap_all(root: nn.Module, fqn: str, new: nn.Module) -> list[tuple[str, nn.Module]]:
    """Swap ``new`` in for the site's linear and every other layer sharing its weight (one
    stand-in, trained against every use); returns what to put back."""
    readers = _readers(root, root.get_submodule(fqn))
    for name, _ in readers:
        _swap(root, name, new)
    return readers


@register
class GQSATrain(Pass):
    """GQSA training: bqpo (block-wise, weights + scales) or e2e (scales only, LM loss)."""

    name = "gqsa-train"
    kinds = ("fx",)
    lossy = True

    @dataclass
    class Options:
        stage: Literal["bqpo", "e2e"] = "bqpo"
        steps: int = 50
        lr: float = 1e-4
        samples: int = 8
        batch: int = 1  # bqpo: samples per step (split over processes under torchrun)
        scale_lr: float = 0.0  # bqpo: the scales' learning rate (0: the same as lr)
        target: Literal["local", "model"] = "local"  # bqpo: see the module docstring
        tail: bool = False  # bqpo: also train compressed sites after the last block (lm_head)
        tail_loss: Literal["mse", "kd"] = "mse"  # bqpo with tail=true: see the module docstring
        loss: Literal["auto", "lm", "kd"] = (
            "auto"  # e2e: next-token loss, or KD (auto: lm for an LM)
        )
        norms: bool = False  # e2e: also train the norm layers' weights (not in the paper)
        # e2e: > 0 also trains the kept weights at this lr (not in the paper)
        weight_lr: float = 0.0
        # e2e: calibration samples held out of training; the trained parameters end at the
        # check (before training, every steps/8 steps, after) with the lowest loss on them
        holdout: int = 0

    def needs_calibration(self) -> bool:
        return True

    def validate(self) -> None:
        o = self.options
        if min(o.steps, o.samples, o.batch) < 1 or o.lr <= 0 or o.scale_lr < 0 or o.weight_lr < 0:
            raise PassOptionError(
                "pass 'gqsa-train': steps, samples and batch must be >= 1, lr > 0, scale_lr >= 0 "
                "and weight_lr >= 0"
            )
        if o.holdout < 0 or (o.holdout and o.holdout >= o.samples):
            raise PassOptionError(
                f"pass 'gqsa-train': need 0 <= holdout < samples (some samples must train), got "
                f"holdout={o.holdout}, samples={o.samples}"
            )
        if o.stage == "bqpo" and o.holdout:
            raise PassOptionError("pass 'gqsa-train': holdout is an option of stage=e2e")
        if o.stage == "e2e" and o.batch != 1:
            raise PassOptionError("pass 'gqsa-train': batch is an option of stage=bqpo")
        if o.tail_loss != "mse" and not (o.stage == "bqpo" and o.tail):
            raise PassOptionError(
                "pass 'gqsa-train': tail_loss is an option of bqpo with tail=true"
            )
        if o.stage == "e2e" and (o.target != "local" or o.tail):
            raise PassOptionError(
                "pass 'gqsa-train': target and tail are bqpo options (stage=e2e trains scales "
                "end to end)"
            )
        if o.stage == "bqpo" and (o.loss != "auto" or o.norms or o.weight_lr):
            raise PassOptionError(
                "pass 'gqsa-train': loss, norms and weight_lr are e2e options (bqpo matches each "
                "block's output and always trains the kept weights, at lr)"
            )

    def requires(self, model, ctx) -> None:
        if not ctx.calibration:
            raise InputError(
                "pass 'gqsa-train' needs calibration inputs (--calib) and none were given"
            )
        processes = world()[1]
        if self.options.stage == "bqpo" and processes > 1 and self.options.batch < processes:
            raise PassOptionError(
                f"pass 'gqsa-train': {processes} processes share each step's samples; give "
                f"batch >= {processes} (got batch={self.options.batch})"
            )
        if self.options.stage == "e2e" and not any(
            s.quantized for s in model.compression.sites.values()
        ):
            raise UnsupportedError(
                "gqsa-train{stage=e2e} trains quantization scales: run quantize first"
            )
        if not any(self._trainable(s) for s in model.compression.sites.values()):
            raise UnsupportedError(
                "pass 'gqsa-train' trains compressed weights: run quantize, group-prune or "
                "nm-prune first"
            )

    def run(self, model, ctx) -> PassResult:
        self._restore: dict[str, list] = {}  # site -> the layers its stand-in replaced
        torch.manual_seed(ctx.seed)
        data = ctx.calibration[: self.options.samples]
        stats = {
            "stage": self.options.stage,
            "samples": len(data),
            "steps": self.options.steps,
            "lr": self.options.lr,
            **(
                {
                    "batch": self.options.batch,
                    "processes": world()[1],
                    "scale_lr": self.options.scale_lr,
                    "target": self.options.target,
                    "tail": self.options.tail,
                    **({"tail_loss": "kd"} if self.options.tail_loss == "kd" else {}),
                }
                if self.options.stage == "bqpo"
                else {
                    "norms": self.options.norms,
                    "weight_lr": self.options.weight_lr,
                    **({"holdout": self.options.holdout} if self.options.holdout else {}),
                }
            ),
            # token ids (batch, sequence), or a streamed stage's hidden states (.., hidden)
            "tokens": int(sum(np.prod(np.shape(next(iter(x.values())))[:2]) for x in data)),
        }
        with torch.enable_grad():
            stats.update(
                self._bqpo(model, data, ctx.stage_block)
                if self.options.stage == "bqpo"
                else self._e2e(model, data)
            )
        model.retrace()
        return PassResult(model, True, stats)

    @staticmethod
    def _trainable(state: SiteState) -> bool:
        """Quantized sites, and pruned sites with their original weights (masked training)."""
        return state.quantized or (state.original is not None and state.pruned)

    def _sites(self, model, prefix: str = "") -> dict[str, SiteState]:
        """Trainable linear sites (quantized embedding tables are not trained here)."""
        return {
            f: s
            for f, s in model.compression.sites.items()
            if self._trainable(s)
            and f.startswith(prefix)
            and isinstance(model.module.get_submodule(f), nn.Linear)
        }

    def _finish(self, model, fqn: str, fq: nn.Module, linear: nn.Linear) -> None:
        state = model.compression.sites[fqn]
        if isinstance(fq, FakeQuantLinear):
            codes, scale, weight = fq.export()
            out, inp = weight.shape
            state.codes, state.scale = codes.view(out, inp // fq.group, fq.group), scale
        else:
            weight = fq.dequantized().detach()
        with torch.no_grad():
            linear.weight.copy_(weight)
        for name, original in self._restore.pop(fqn, [(fqn, linear)]):
            _swap(model.module, name, original)

    def _fakes(self, model, sites: dict[str, SiteState]) -> dict:
        """Swap each site's linear for its trainable stand-in; {fqn: (stand-in, linear)}."""
        fakes = {}
        for fqn, state in sites.items():
            linear = model.module.get_submodule(fqn)
            fq = (
                FakeQuantLinear(linear, state, train_weight=True)
                if state.quantized
                else MaskedLinear(linear, state)
            )
            fakes[fqn] = (fq, linear)
            self._restore[fqn] = _swap_all(model.module, fqn, fq)
        return fakes

    def _fit(self, fakes: dict, loss_of, count: int, advance) -> float:
        """Adam with a cosine-annealed lr over ``steps``, each step the mean loss of the next
        ``batch`` samples, cycling through ``count``; ``loss_of(i)`` is sample i's loss. Under
        torchrun each process takes every world-th sample of a step and the gradients are summed
        (data parallel: the step is the one-process step, up to float order). Returns the first
        step's loss."""
        scale_lr = self.options.scale_lr or self.options.lr
        b = self.options.batch
        rank, size = world()

        def step_loss(step: int) -> torch.Tensor:
            mine = [(step * b + j) % count for j in range(b)][rank::size]
            return sum(loss_of(i) for i in mine) / b

        groups = [
            {"params": [fq.weight for fq, _ in fakes.values()]},
            {
                "params": [fq.scale for fq, _ in fakes.values() if isinstance(fq, FakeQuantLinear)],
                "lr": scale_lr,
            },
        ]
        log = train(
            groups,
            step_loss,
            self.options.steps,
            self.options.lr,
            advance=advance,
            data_parallel=True,
        )
        return log.losses[0]

    def _bqpo(self, model, data, stage_block: str = "") -> dict:
        if stage_block:  # one stage of a streamed model: a block, or the head (no block)
            index = stage_block.rpartition(".")[2]
            blocks = [Block(stage_block, int(index), [])] if index.isdigit() else []
            if not blocks:
                return {"blocks": 0, "block_mse_first_step": 0.0, "block_mse_after": 0.0}
        else:
            blocks = find_blocks(model)
        if not blocks:
            raise UnsupportedError("bqpo needs repeated transformer blocks and none were found")
        module = model.module
        inputs = capture_block_inputs(module, module.get_submodule(blocks[0].fqn), data)
        reference = [a[0] for a, _ in inputs]  # the original model's hidden states (target=model)
        tail = (
            {
                f: n
                for f, n in self._sites(model).items()
                if not any(f.startswith(b.fqn + ".") for b in blocks)
            }
            if self.options.tail
            else {}
        )
        if tail:  # their targets: the original layers on the original model's inputs
            tail_targets = self._tail_targets(model, tail, data)
        units = self._units(model, blocks)
        progress, task = bar((len(units) + bool(tail)) * self.options.steps, "bqpo")
        first_loss = last_loss = 0.0
        with progress:
            for leader, members in units:
                sites = self._sites(model, leader + ".")
                students = [module.get_submodule(m) for m in members]
                teachers = [_original_copy(b, sites, leader + ".") for b in students]
                with torch.no_grad():  # the targets known before training
                    if self.options.target == "model":  # the original model's chain
                        chain = []
                        for teacher in teachers:
                            reference = [
                                block_output(teacher(h, *a[1:], **k))
                                for h, (a, k) in zip(reference, inputs)
                            ]
                            chain.append(reference)
                    else:  # the first block's original on its (fixed) inputs
                        chain = [[block_output(teachers[0](*a, **k)) for a, k in inputs]]
                fakes = self._fakes(model, sites)

                def target_of(pos, i, h, teachers=teachers, chain=chain, inputs=inputs):
                    """Block ``pos``'s target on sample i: known before training, or (a block
                    after the first, target=local) its original on the input ``h`` it gets now."""
                    if pos < len(chain):
                        return chain[pos][i]
                    args, kwargs = inputs[i]
                    with torch.no_grad():
                        return block_output(teachers[pos](h.detach(), *args[1:], **kwargs))

                def unit_loss(i, students=students, inputs=inputs, target_of=target_of):
                    """The mean over the unit's blocks (one, or a group sharing weights) of each
                    block's squared error; a block after the first gets the output of the one
                    before as it is now."""
                    args, kwargs = inputs[i]
                    h, total = args[0], 0.0
                    for pos, student in enumerate(students):
                        out = block_output(student(h, *args[1:], **kwargs))
                        total = total + nn.functional.mse_loss(out, target_of(pos, i, h))
                        h = out.detach()
                    return total / len(students)

                first_loss += len(members) * self._fit(  # summed over blocks, as below
                    fakes, unit_loss, len(inputs), lambda: progress.advance(task)
                )
                for fqn, (fq, linear) in fakes.items():
                    self._finish(model, fqn, fq, linear)
                with torch.no_grad():  # one forward gives the next block's inputs and the loss
                    hidden = [a[0] for a, _ in inputs]
                    for pos, student in enumerate(students):
                        outputs = [
                            block_output(student(h, *a[1:], **k))
                            for h, (a, k) in zip(hidden, inputs)
                        ]
                        targets = [target_of(pos, i, h) for i, h in enumerate(hidden)]
                        last_loss += sum(
                            float(nn.functional.mse_loss(o, t)) for o, t in zip(outputs, targets)
                        ) / len(inputs)
                        hidden = outputs
                    inputs = [((o, *a[1:]), k) for o, (a, k) in zip(hidden, inputs)]
                    del outputs, hidden
            stats = {
                "blocks": sum(len(m) for _, m in units),
                "shared_groups": sum(len(m) > 1 for _, m in units),
                "block_mse_first_step": first_loss,
                "block_mse_after": last_loss,
            }
            if tail:
                stats.update(
                    self._train_tail(
                        model, tail, tail_targets, data, lambda: progress.advance(task)
                    )
                )
        return stats

    @staticmethod
    def _units(model, blocks) -> list[tuple[str, list[str]]]:
        """(leader, members) in model order: each block with the blocks after it that read its
        weights (share-blocks), trained as one unit so a shared weight is trained once against
        every block that uses it; a unit of one block without sharing."""
        shared = {f: b.shares_with for f, b in model.compression.blocks.items() if b.shares_with}
        if not shared:
            return [(b.fqn, [b.fqn]) for b in blocks]
        container = blocks[0].fqn.rpartition(".")[0]
        units: list[tuple[str, list[str]]] = []
        for i in range(len(model.module.get_submodule(container))):
            fqn = f"{container}.{i}"
            leader = shared.get(fqn, fqn)
            if units and units[-1][0] == leader:
                units[-1][1].append(fqn)
            else:
                units.append((leader, [fqn]))
        return units

    @staticmethod
    def _site_inputs(model, fqns, data) -> dict[str, list[torch.Tensor]]:
        """Each named linear's input on every calibration sample (one full forward each)."""
        seen: dict[str, list[torch.Tensor]] = {f: [] for f in fqns}
        handles = [
            model.module.get_submodule(f).register_forward_pre_hook(
                lambda _m, args, f=f: seen[f].append(args[0].detach())
            )
            for f in fqns
        ]
        try:
            with torch.no_grad():
                for x in data:
                    model.module(**{k: torch.from_numpy(np.asarray(v)) for k, v in x.items()})
        finally:
            for h in handles:
                h.remove()
        return seen

    def _tail_targets(self, model, tail: dict, data) -> dict:
        """What the original layers compute on the original model's inputs: {fqn: (inputs,
        original weight, bias)}. Only the inputs are stored (logits for many samples would not
        fit in memory); the loss runs the original layer on them. Every compressed site holds its
        original weight for one pass over the data, then gets its compressed weight back."""
        everything = self._sites(model)
        kept = {}
        with torch.no_grad():
            for fqn, state in everything.items():
                weight = model.module.get_submodule(fqn).weight
                kept[fqn] = weight.detach().clone()
                weight.copy_(state.original)
            try:
                seen = self._site_inputs(model, list(tail), data)
            finally:
                for fqn, w in kept.items():
                    model.module.get_submodule(fqn).weight.copy_(w)
        return {
            f: (
                xs,
                everything[f].original.detach().float(),
                model.module.get_submodule(f).bias,
            )
            for f, xs in seen.items()
        }

    def _train_tail(self, model, tail, targets, data, advance) -> dict:
        inputs = self._site_inputs(model, list(tail), data)
        fakes = self._fakes(model, tail)
        names = list(tail)

        def target(f, i):
            xs, weight, bias = targets[f]
            with torch.no_grad():
                return nn.functional.linear(xs[i], weight, bias)

        def distance(out, ref):
            if self.options.tail_loss == "mse":
                return nn.functional.mse_loss(out, ref)
            return _next_token_kl(out, ref)

        def tail_loss(i, layer=lambda f: fakes[f][0]):
            return sum(distance(layer(f)(inputs[f][i]), target(f, i)) for f in names)

        def mean_loss(layer) -> float:
            with torch.no_grad():
                return sum(float(tail_loss(i, layer)) for i in range(len(data))) / len(data)

        before = mean_loss(lambda f: fakes[f][0])
        self._fit(fakes, tail_loss, len(data), advance)
        for fqn, (fq, linear) in fakes.items():
            self._finish(model, fqn, fq, linear)
        after = mean_loss(model.module.get_submodule)  # the trained layers, swapped back in
        what = self.options.tail_loss
        return {"tail_sites": names, f"tail_{what}_before": before, f"tail_{what}_after": after}

    def _e2e(self, model, data) -> dict:
        module = model.module
        kind = resolve_loss(module, data[0], self.options.loss, self.name)
        teacher = _original_copy(module, self._sites(model)) if kind == "kd" else None
        fakes = {}
        for fqn, state in self._sites(model).items():
            if not state.quantized:
                continue  # no scales to train on a pruned-only site
            linear = module.get_submodule(fqn)
            fq = FakeQuantLinear(linear, state, train_weight=self.options.weight_lr > 0, grid=True)
            fakes[fqn] = (fq, linear)
            self._restore[fqn] = _swap_all(module, fqn, fq)
        norms = _norm_weights(module) if self.options.norms else []
        was = [p.requires_grad for p in norms]
        for p in norms:
            p.requires_grad_(True)
        groups = [{"params": [fq.scale for fq, _ in fakes.values()] + norms}]
        if self.options.weight_lr:  # the kept weights too: codes re-round (straight-through)
            weights = [fq.weight for fq, _ in fakes.values()]
            groups.append({"params": weights, "lr": self.options.weight_lr})
        lm = []
        holdout = self.options.holdout
        if holdout and len(data) <= holdout:
            raise InputError(
                f"pass 'gqsa-train': holdout={holdout} needs more calibration samples than that "
                f"(got {len(data)})"
            )
        held, data = data[len(data) - holdout :] if holdout else [], data[: len(data) - holdout]

        def loss_on(sample: dict, record: bool) -> torch.Tensor:
            x = {k: torch.from_numpy(np.asarray(v)) for k, v in sample.items()}
            output = module(**x)
            logits, is_logits = model_output(output)
            if not is_logits:  # an encoder: its output hidden states against the original's
                with torch.no_grad():
                    target = teacher(**x)
                return output_distance(output, target)
            flat = logits[:, :-1].reshape(-1, logits.shape[-1])
            next_token = nn.functional.cross_entropy(flat, x["input_ids"][:, 1:].reshape(-1))
            if record:
                lm.append(float(next_token.detach()))
            if teacher is None:
                return next_token
            with torch.no_grad():  # KL(original || compressed) over the vocabulary, per token
                target = logits_of(teacher(**x))[:, :-1].reshape(flat.shape)
            return _next_token_kl(flat, target)

        trained = [p for g in groups for p in g["params"]]
        checks: list[tuple[int, float]] = []
        best: list = [None, None]  # (step, loss), the parameters then
        every = max(1, self.options.steps // HOLDOUT_CHECKS)

        @torch.no_grad()
        def check(step: int) -> None:
            loss = sum(float(loss_on(x, False)) for x in held) / len(held)
            checks.append((step, loss))
            if best[0] is None or loss < best[0][1]:
                best[:] = [(step, loss), [p.detach().clone() for p in trained]]

        def loss_of(step: int) -> torch.Tensor:
            if held and step % every == 0:
                check(step)
            return loss_on(data[step % len(data)], True)

        try:
            losses = train(
                groups, loss_of, self.options.steps, self.options.lr, label="e2e-oqp"
            ).losses
            if held:
                check(self.options.steps)
                with torch.no_grad():
                    for p, value in zip(trained, best[1]):
                        p.copy_(value)
        finally:
            for fqn, (fq, linear) in fakes.items():
                self._finish(model, fqn, fq, linear)
            for p, w in zip(norms, was):
                p.requires_grad_(w)
        stats = {"loss": kind, "layers": len(fakes), "norm_weights_trained": len(norms)}
        if lm:
            stats.update(lm_loss_first_step=lm[0], lm_loss_last_step=lm[-1])
        if teacher is not None:
            stats.update(kd_loss_first_step=losses[0], kd_loss_last_step=losses[-1])
        if held:
            stats.update(
                held_out_loss_start=checks[0][1],
                held_out_loss_last=checks[-1][1],
                held_out_loss_kept=best[0][1],
                held_out_kept_step=best[0][0],
                held_out_checks=[[step, loss] for step, loss in checks],
            )
        return stats


HOLDOUT_CHECKS = 8  # held-out checks in an e2e run with holdout (plus one before, one after)


def _norm_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights of the norm layers (LayerNorm, RMSNorm and the like: a module whose class name
    ends in "Norm" with a 1-D weight)."""
    return [
        m.weight
        for m in module.modules()
        if type(m).__name__.endswith("Norm")
        and isinstance(getattr(m, "weight", None), nn.Parameter)
        and m.weight.dim() == 1
    ]


def _original_copy(root: nn.Module, sites: dict[str, SiteState], prefix: str = "") -> nn.Module:
    """A frozen copy of ``root`` (the model, or one block whose names start with ``prefix``) with
    every compressed site's original weight back in: the teacher of both training stages."""
    teacher = copy.deepcopy(root).eval()
    with torch.no_grad():
        for fqn, state in sites.items():
            teacher.get_submodule(fqn[len(prefix) :]).weight.copy_(state.original)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _next_token_kl(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher) || softmax(logits)), the last axis the
    vocabulary (e2e's loss=kd and bqpo's tail_loss=kd)."""
    logits, teacher = (t.reshape(-1, t.shape[-1]) for t in (logits, teacher))
    return nn.functional.kl_div(
        nn.functional.log_softmax(logits, -1),
        nn.functional.log_softmax(teacher, -1),
        log_target=True,
        reduction="batchmean",
    )
