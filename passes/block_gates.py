"""block-gates: FoldGPT's learnable block gates, one per transformer block, trained jointly on
calibration text (every weight frozen) to rank blocks for removal (``remove-blocks{score=gates}``
reads them); the ranking and gate values go to the compression state and the report, and the
model itself is left unchanged.

``method=sampled`` (default): each block's gate is a learnable logit theta; every step draws
``draws`` removal masks, each dropping exactly ``count`` blocks (the removal budget; blocks have
equal FLOPs, so it is the FLOPs constraint too) by a Gumbel-top-k draw from the gates
(Plackett-Luce), runs the model with those blocks skipped on one calibration chunk and measures
how far its output moves from the original's (log KL of the next-token distributions; an
encoder's output hidden states); the gates follow the score-function gradient with each draw's
cost against the mean of the others (same chunk: the chunk's own difficulty cancels). Every draw
removes ``count`` blocks together, so the gates learn which blocks can go *jointly*: the coupling
that one-at-a-time scores miss. As the draw distribution concentrates the gates polarize. Gates
start from the cosine scores (``init=cosine``: theta = -4 (c - mean c) / (max c - min c)) or
level (``init=uniform``). After training, ``polish`` rounds of swap search (``near`` blocks beyond
the chosen ones, by gate) measure, on 8 calibration chunks, whether trading one chosen block for
one of those lowers the same cost, and take the best trade: the gates' decision is refined where
they are least sure, for ``count x near`` removals measured per round. Reported gate =
sigmoid(theta), the chosen blocks' lowered just below every kept one's where a swap brought them
in (the learned ones are in the report too). ``probe=S`` aims at the model after the cure rather
than the removal alone: the ``candidates`` cheapest sets polish measured (the gates' choice among
them) each get S steps of a short cure (every kept block's weights and norms distilled towards
the original model's outputs, cure's default lr, on the model with the set skipped), their cost
is measured again, the weights go back, and the set that costs least after its probe is chosen
(the report lists each set's cost before and after). On SmolLM2-135M (3 / 6 / 9 / 12 of 30
removed, 150 steps, no polish): perplexity 33.0 / 46.6 / 97.6 / 191 against cosine's 33.0 / 53.1
/ 96.6 / 1,092; with polish, 3 removed reads 31.4 (two trades) and 9 removed 79.8 (one trade:
block 6 out, 15 in), level with greedy removal (tools/quality/results/smollm2_perplexity.md).

``method=scale``: the continuous form ``y = x + g * (block(x) - x)`` with g in [0, 1] (projected
Adam). Loss: next-token cross-entropy of the gated model (``loss=lm``) or its distance from the
ungated model (``loss=kd``: KL divergence of the next-token distributions; for an encoder such as
BERT, which has no logits, the mean squared error of the output hidden states over the ungated
one's mean square); ``loss=auto`` (default) is ``lm`` for a language model and ``kd`` for an
encoder; plus a polarizing regulariser ``lam * (t * sum|g| - sum|g - mean g|)`` (Zhuang et al.
2020: it drives some gates to 0 and keeps the others up, instead of shrinking all alike) and a
budget term ``budget * (mean g - (1 - rate))^2`` that pulls the total gate mass to the blocks kept
at removal rate ``rate``. A gate at 0.5 is a model neither with nor without the block, so its
gradient measures a scaled block, not a removed one: on SmolLM2 it ranked worse than cosine
(76.1 at 6 removed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
    next_token_loss,
    output_distance,
    resolve_loss,
    train,
)
from effc.passes.remove_blocks import Skipping, cosine_scores
from effc.registry import register


@register
class BlockGates(Pass):
    """Learn one gate per transformer block (weights frozen) to rank blocks for removal."""

    name = "block-gates"
    kinds = ("fx",)

    @dataclass
    class Options:
        method: Literal["sampled", "scale"] = "sampled"
        steps: int = 128
        lr: float = 0.1
        samples: int = 8
        rate: float = 0.2  # the removal rate the budget aims at (count=0)
        count: int = 0  # blocks each draw removes (sampled); 0: round(rate * blocks)
        draws: int = 4  # removal masks drawn per step (sampled)
        seq: int = 256  # tokens per training chunk (sampled; 0: whole samples)
        init: Literal["cosine", "uniform"] = "cosine"  # sampled
        polish: int = 2  # rounds of swap search after training (sampled; 0: off)
        near: int = 3  # blocks beyond the chosen ones each polish round tries (by gate)
        probe: int = 0  # steps of a short cure each candidate set gets before choosing (0: off)
        candidates: int = 3  # sets the probe tries: the polished choice and the next best
        lam: float = 0.01  # polarizing regulariser weight (scale)
        t: float = 1.2  # its balance (> 1: shrink overall; the - |g - mean| term polarizes)
        budget: float = 1.0  # weight of the gate-mass (FLOPs) term (scale)
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
        if o.count < 0 or o.draws < 2 or o.seq < 0 or o.polish < 0 or o.near < 1:
            raise PassOptionError(
                f"pass 'block-gates': need count >= 0, draws >= 2 (each draw is judged against "
                f"the others), seq >= 0, polish >= 0 and near >= 1, got count={o.count}, "
                f"draws={o.draws}, seq={o.seq}, polish={o.polish}, near={o.near}"
            )
        if o.probe < 0 or o.candidates < 2 or (o.probe and o.method != "sampled"):
            raise PassOptionError(
                f"pass 'block-gates': probe >= 0 (steps; method=sampled only) and candidates >= 2, "
                f"got probe={o.probe}, candidates={o.candidates}, method={o.method}"
            )

    def requires(self, model, ctx) -> None:
        super().requires(model, ctx)
        _, layers, _ = block_layers(model, self.name, every_block=False)
        if any("input_ids" not in x for x in ctx.calibration):
            raise UnsupportedError(
                "pass 'block-gates' trains on text: the calibration samples need input_ids"
            )
        count = self.removal_count(len(layers))
        if self.options.method == "sampled" and not 1 <= count < len(layers):
            raise PassOptionError(
                f"pass 'block-gates': each draw removes {count} of the model's {len(layers)} "
                "blocks; need at least 1 and fewer than all (set count or rate)"
            )

    def removal_count(self, blocks: int) -> int:
        o = self.options
        return o.count or round(o.rate * blocks)

    def run(self, model, ctx) -> PassResult:
        o = self.options
        torch.manual_seed(ctx.seed)
        container, layers, _ = block_layers(model, self.name, every_block=False)
        data = ctx.calibration[: o.samples]
        with model.plain_outputs():  # the model as it is
            asked = "kd" if o.method == "sampled" and o.loss == "auto" else o.loss
            kind = resolve_loss(model.module, data[0], asked, self.name)
        frozen = [(p, p.requires_grad) for p in model.module.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        try:
            if o.method == "sampled":
                values, stats = self._sampled(model, layers, data, kind)
            else:
                values, stats = self._scale(model, layers, data, kind)
        finally:
            for p, was in frozen:
                p.requires_grad_(was)
        for i, v in enumerate(values):
            model.compression.block(f"{container}.{i}").gate = v
        stats = {
            "method": o.method,
            "gates": [round(v, 4) for v in values],
            "ranking_weakest_first": sorted(range(len(values)), key=lambda i: values[i]),
            "loss": kind,
            **stats,
        }
        return PassResult(model, False, stats)

    def _sampled(self, model, layers, data, kind) -> tuple[list[float], dict]:
        o = self.options
        n = len(layers)
        count = self.removal_count(n)
        chunks = chunked(data, o.seq)
        if o.init == "cosine":
            c = torch.tensor(cosine_scores(model, layers, chunks))
            theta0 = -4.0 * (c - c.mean()) / (c.max() - c.min()).clamp_min(1e-12)
        else:
            theta0 = torch.zeros(n)
        theta = nn.Parameter(theta0.float())
        inputs = [{k: torch.as_tensor(np.asarray(v)) for k, v in x.items()} for x in chunks]
        teachers: dict[int, object] = {}
        held = [0]  # bytes of the cached teacher outputs
        costs: list[list[float]] = []

        def teacher(i: int, skip: Skipping):
            if i in teachers:
                return teachers[i]
            skip.skipped.clear()
            out = model.module(**inputs[i])
            size = model_output(out)[0].nbytes
            if held[0] + size <= TEACHER_BYTES:
                teachers[i] = out
                held[0] += size
            return out

        def distance(out, reference, x) -> torch.Tensor:
            if kind == "kd":
                return output_distance(out, reference)
            return next_token_loss(out, x["input_ids"])

        def cost(out, reference, x) -> float:
            return float(np.log(max(float(distance(out, reference, x)), 1e-12)))

        with Skipping(layers) as skip, model.plain_outputs():

            def removal_cost(i: int, removed, reference) -> float:
                """The cost of chunk ``i`` with the ``removed`` blocks skipped."""
                skip.skipped.clear()
                skip.skipped.update(removed)
                out = cost(model.module(**inputs[i]), reference, inputs[i])
                skip.skipped.clear()
                return out

            def loss_of(step: int) -> torch.Tensor:
                i = step % len(inputs)
                drawn, orders = [], []
                with torch.no_grad():
                    reference = teacher(i, skip) if kind == "kd" else None
                    for _ in range(o.draws):
                        gumbel = -torch.log(-torch.log(torch.rand(n).clamp(1e-9, 1 - 1e-9)))
                        order = torch.argsort(gumbel - theta, descending=True)[:count].tolist()
                        drawn.append(removal_cost(i, order, reference))
                        orders.append(order)
                costs.append(drawn)
                c = torch.tensor(drawn)
                advantage = c - (c.sum() - c) / (len(drawn) - 1)  # against the other draws
                return sum(
                    a * plackett_luce(-theta, order) for a, order in zip(advantage, orders)
                ) / len(drawn)

            # a constant step: the draws keep exploring to the end of a short run
            log = train(
                [{"params": [theta]}], loss_of, o.steps, o.lr, cosine=False, label="block-gates"
            )
            learned = theta.detach().clone()
            rank = sorted(range(n), key=lambda i: float(learned[i]))  # weakest first
            picks = list(range(len(inputs)))[:: max(1, len(inputs) // POLISH_CHUNKS)]
            picks = picks[:POLISH_CHUNKS]

            @torch.no_grad()
            def set_cost(removed: frozenset) -> float:
                total = 0.0
                for i in picks:
                    total += removal_cost(i, removed, teacher(i, skip) if kind == "kd" else None)
                return total / len(picks)

            if o.polish:
                started = time.perf_counter()
                chosen, polished = polish(set_cost, rank, count, o.near, o.polish)
                polished["polish_seconds"] = round(time.perf_counter() - started, 2)
            else:
                chosen, polished = sorted(rank[:count]), {}
            sets = polished.pop("sets", None)
            if o.probe:
                started = time.perf_counter()
                sets = sets or {frozenset(chosen): set_cost(frozenset(chosen))}
                chosen, probed = self._probe(
                    model, layers, skip, inputs, picks, sets, distance, cost
                )
                polished.update(probed, probe_seconds=round(time.perf_counter() - started, 2))
        values = [float(v) for v in torch.sigmoid(put_lowest(learned, chosen))]
        first, last = costs[: max(1, len(costs) // 8)], costs[-max(1, len(costs) // 8) :]
        stats = {
            "count": count,
            "draws": o.draws,
            "chunks": len(inputs),
            "init": o.init,
            "log_cost_first": float(np.mean(first)),
            "log_cost_last": float(np.mean(last)),
            "chosen": chosen,
            "gates_learned": [round(float(v), 4) for v in torch.sigmoid(learned)],
            **polished,
            **log.budget(),
        }
        return values, stats

    def _probe(
        self, model, layers, skip, inputs, picks, sets, distance, cost
    ) -> tuple[list[int], dict]:
        """A short cure for each of the ``candidates`` best sets measured (by their cost before
        any cure): the kept blocks' weights and norms train ``probe`` steps towards the original
        model's outputs (the cure's logits distillation, at its default lr), the set's cost is
        measured again on the polish chunks, and the weights go back. The set that costs least
        after its probe is chosen: what the cure after removal will start from, rather than the
        removal alone (the two disagree where a set that costs more before the cure cures
        better)."""
        o = self.options
        ranked = sorted(sets.items(), key=lambda kv: kv[1])[: o.candidates]
        steps = [i % len(inputs) for i in range(o.probe)]
        params = [p for p in layers.parameters() if p.is_floating_point()]
        saved = [p.detach().clone() for p in params]

        def run(i: int):
            return model.module(**inputs[i])

        with torch.no_grad():  # the original model's outputs, before any weight moves
            skip.skipped.clear()
            reference = {i: run(i) for i in sorted(set(steps) | set(picks))}

        def loss_of(step: int) -> torch.Tensor:
            i = steps[step]
            return distance(run(i), reference[i], inputs[i])

        @torch.no_grad()
        def restore() -> None:  # the weights as they were, frozen again, no block skipped
            skip.skipped.clear()
            for p, v in zip(params, saved):
                p.requires_grad_(False)
                p.copy_(v)

        tried = []
        for removed, before in ranked:
            try:
                skip.skipped.update(removed)
                for p in params:
                    p.requires_grad_(True)
                label = f"block-gates: probe {sorted(removed)}"
                train([{"params": params}], loss_of, o.probe, PROBE_LR, label=label)
                with torch.no_grad():
                    after = float(np.mean([cost(run(i), reference[i], inputs[i]) for i in picks]))
                tried.append({"removed": sorted(removed), "log_cost": before, "probed": after})
            finally:
                restore()
        best = min(tried, key=lambda t: t["probed"])
        return best["removed"], {"probe_steps": o.probe, "probe_lr": PROBE_LR, "probed": tried}

    def _scale(self, model, layers, data, kind) -> tuple[list[float], dict]:
        o = self.options
        module = model.module
        gates = nn.Parameter(torch.ones(len(layers)))
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
                task = next_token_loss(output, x["input_ids"])
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
        clip()
        stats = {
            f"{kind}_loss_first": task_loss[0],
            f"{kind}_loss_last": sum(task_loss[-4:]) / len(task_loss[-4:]),
            **log.budget(),
        }
        return [float(v) for v in gates.detach()], stats


TEACHER_BYTES = 2 << 30  # the original model's outputs kept between steps (beyond it: recomputed)
PROBE_LR = 1e-4  # the probe's short cure: cure's default learning rate
POLISH_CHUNKS = 8  # calibration chunks (spread over the samples) each polished set is measured on


def polish(
    cost: Callable[[frozenset], float], rank: list[int], count: int, near: int, rounds: int
) -> tuple[list[int], dict]:
    """Swap search from the gates' choice (the ``count`` first of ``rank``, weakest first): each
    round measures every swap of one chosen block for one of the ``near`` next blocks by gate
    and takes the best if it lowers ``cost``; stops at ``rounds`` or when none does. The gates
    learn a distribution over removals; this spends a few forward passes on the decision at its
    boundary, where the gates are least sure. Returns (chosen blocks sorted, stats)."""
    current = frozenset(rank[:count])
    best = start = cost(current)
    seen = {current: start}  # every set measured, with its cost
    swaps, measured = [], 1
    for _ in range(rounds):
        outside = [j for j in rank if j not in current][:near]
        trials = [(cost(current - {i} | {j}), i, j) for i in sorted(current) for j in outside]
        seen.update({current - {i} | {j}: c for c, i, j in trials})
        measured += len(trials)  # never empty: count < blocks leaves a block outside
        c, i, j = min(trials)
        if c >= best:
            break
        current, best = current - {i} | {j}, c
        swaps.append({"out": i, "in": j, "log_cost": round(c, 4)})
    stats = {"polish_log_cost_start": start, "polish_log_cost": best, "polish_swaps": swaps}
    return sorted(current), {**stats, "polish_sets_measured": measured, "sets": seen}


def put_lowest(theta: torch.Tensor, chosen: list[int]) -> torch.Tensor:
    """``theta`` with the chosen blocks' logits lowered, where needed, just below every other
    block's, so the gates rank the chosen blocks weakest (what ``remove-blocks{score=gates}``
    removes); the order within each side is the learned one."""
    theta, chosen_set = theta.clone(), set(chosen)
    others = [i for i in range(len(theta)) if i not in chosen_set]
    if others:
        floor = float(theta[others].min())
        for i in chosen:
            theta[i] = min(float(theta[i]), floor - 1e-3)
    return theta


def plackett_luce(scores: torch.Tensor, order: list[int]) -> torch.Tensor:
    """log-probability of drawing ``order`` first (without replacement) under the Plackett-Luce
    model with these scores: what a Gumbel-top-k draw follows."""
    taken = torch.zeros(len(scores), dtype=torch.bool)
    total = scores.new_zeros(())
    for j in order:
        total = total + scores[j] - torch.logsumexp(scores.masked_fill(taken, -torch.inf), 0)
        taken = taken.clone()
        taken[j] = True
    return total


def chunked(data: list[dict], seq: int) -> list[dict]:
    """Calibration samples cut into chunks of ``seq`` tokens (every array [1, length]; a shorter
    tail dropped unless it is a whole sample); ``seq=0`` or other shapes: the samples as they are."""
    out = []
    for x in data:
        arrays = {k: np.asarray(v) for k, v in x.items()}
        lengths = {a.shape[-1] if a.ndim == 2 and a.shape[0] == 1 else -1 for a in arrays.values()}
        if not seq or len(lengths) != 1 or (length := lengths.pop()) <= seq:
            out.append(x)
            continue
        for start in range(0, length - seq + 1, seq):
            out.append({k: a[:, start : start + seq] for k, a in arrays.items()})
    return out
