"""group-prune: GQSA's group-structured pruning of 1 x g groups along each row's input dimension.

Scores (per group, summed over its g weights):
    magnitude:  sum_j |W[r, j]|
    wanda:      sum_j |W[r, j]| * ||X[:, j]||_2      (activation-aware, from calibration inputs)
    obs:        sum_j W[r, j]^2 / U[j, j]^2          (optimal brain surgeon saliency; U is the upper
                Cholesky factor of the inverse Hessian H^-1, H = X^T X of the calibration inputs)
                and the pruned groups' loss is compensated: the kept weights of each row are
                updated column by column so the layer's output on the calibration inputs changes
                least (SparseGPT, Frantar & Alistarh 2023, with 1 x g group masks).
Budgets keep exactly round((1 - sparsity) * groups) groups:
    row:    the same count in every row (the tail of the division spread one per row);
    layer:  the best groups of each layer, rows may differ;
    global: the best groups of all layers, scores normalised by each layer's mean score.
allocate=sensitivity gives each layer its own sparsity within ``target +- spread`` (the model-wide
budget still exact). A layer's cost curve: its own relative output error tr(dW H dW^T)/tr(W H W^T)
at ``target - spread``, ``target`` and ``target + spread`` (from the calibration Hessian, no model
runs), scaled so that at ``target`` it equals the measured deviation of the whole model's outputs
when that layer alone is pruned (one model run per layer and calibration sample,
``sensitivity_samples``): with ``metric=mse`` the relative error ``||y' - y||^2 / ||y||^2``, with
``metric=kl`` the mean KL divergence of the next-token distribution (the outputs read as logits:
what perplexity feels, where a squared logit error weighs every vocabulary entry alike). Assuming
the deviations add up, a greedy walk over the lower convex hull of every curve spends the pruning
budget where it costs the least output deviation per pruned weight (the Lagrangian optimum). The
sparsity chosen per layer is reported.
``logit_weight=a`` (a > 0) treats the layer that computes the model's output logits (lm_head)
apart: an error in token t's logit costs about p_t times its square in next-token KL (the softmax
Fisher diag(p) - p p^T, its diagonal), so row t's scores are multiplied by pbar_t^a, pbar the
original model's mean predicted probability of t over the calibration positions, and that layer's
rows keep different counts (layer scope): rows of tokens the model rarely predicts give up groups
to the frequent ones. a = 1 is the Fisher weighting; a = 0.5 hedges it for tokens rarer in
calibration than in use (SmolLM2-135M, lm_head alone at 50%: 120.6 perplexity with rows alike,
76.5 with a = 1, 72.2 with a = 0.5; at 70%: 565, 200, 171). The weights are reported.
``pin=[NAME:SPARSITY, ...]`` fixes the sparsity of the layers whose FQN contains NAME (the first
matching entry wins); the other layers share what the pinned ones leave of the model-wide budget,
evenly under allocate=uniform and by sensitivity under allocate=sensitivity (where the pinned
layers' sensitivity is not measured). The sensitivity allocation judges a layer by its own output
deviation, so it can push a layer that later training cannot recover far (SmolLM2-135M's lm_head
goes to target + spread, 0.7); ``pin=[lm_head:0.5]`` holds it at the target.
Pruned groups are written as zeros and the keep-mask is recorded in the model's compression state
(``model.compression.site(fqn).mask``, (out, in/g)) for quantization and the BSR packer, with the
uncompressed weight (``"original"``) that training passes use as their teacher. A tied

lm_head is untied first, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as nn_f

from effc.errors import InputError, PassOptionError, UnsupportedError
from effc.ir.calibrate import compress_sequentially
from effc.ir.reducers import ColumnNorms, HessianSum, activation_norms, hessians
from effc.ir.sites import compressible_sites, file_view, read_weight, write_weight
from effc.pass_base import Pass, PassResult
from effc.passes._obs import inverse_hessian_factor, layer_error, obs_prune, obs_scores
from effc.progress import bar
from effc.registry import register


def group_scores(
    weight: torch.Tensor, group: int, act_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """(out, in) weight -> (out, in/g) group scores."""
    w = weight.abs().float()
    if act_norm is not None:
        w = w * act_norm.float()[None, :]
    out, inp = w.shape
    return w.view(out, inp // group, group).sum(-1)


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(scores.reshape(-1), k, sorted=False).indices] = True
    return mask.view_as(scores)


def row_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep ``keep`` groups in total, spread evenly over rows (rows differ by at most one)."""
    out, ngroups = scores.shape
    base, extra = divmod(keep, out)
    order = scores.argsort(dim=1, descending=True)
    counts = torch.full((out,), base, dtype=torch.long)
    counts[:extra] += 1
    ranks = torch.arange(ngroups)[None, :] < counts[:, None]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order, ranks)
    return mask


def lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of (x, y) points, in ascending x."""
    hull: list[tuple[float, float]] = []
    for p in sorted(points):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(
    curves: dict[str, list[tuple[float, float]]], sizes: dict[str, int], target: float
) -> dict[str, float]:
    """Per-layer sparsities minimising the summed cost under sum(size * s) = target * sum(size).

    ``curves[k]``: (sparsity, cost) points of layer k; the greedy walk over each curve's lower
    convex hull, cheapest marginal cost per pruned weight first, is the Lagrangian optimum of the
    piecewise-linear problem. The last step is taken in part, so the budget is met exactly."""
    import heapq

    hulls = {k: lower_hull(c) for k, c in curves.items()}
    chosen = {k: h[0][0] for k, h in hulls.items()}
    budget = target * sum(sizes.values()) - sum(sizes[k] * s for k, s in chosen.items())
    heap = []

    def push(k: str, i: int) -> None:
        h = hulls[k]
        if i + 1 < len(h):
            (x0, y0), (x1, y1) = h[i], h[i + 1]
            heapq.heappush(heap, ((y1 - y0) / (sizes[k] * (x1 - x0)), k, i))

    for k in hulls:
        push(k, 0)
    while heap and budget > 1e-9:
        _, k, i = heapq.heappop(heap)
        (x0, _), (x1, _) = hulls[k][i], hulls[k][i + 1]
        step = min(x1 - x0, budget / sizes[k])
        chosen[k] = x0 + step
        budget -= step * sizes[k]
        push(k, i + 1)
    return chosen


def keep_counts(
    sizes: dict[str, int],
    sparsities: dict[str, float],
    target: float,
    fixed: frozenset[str] = frozenset(),
) -> dict[str, int]:
    """Kept groups per layer (``sizes``: groups per layer) for per-layer sparsities, corrected so
    the model-wide count equals round((1 - target) * groups) exactly (the residual goes to the
    largest layer not in ``fixed``)."""
    keep = {k: round((1 - sparsities[k]) * n) for k, n in sizes.items()}
    residual = round((1 - target) * sum(sizes.values())) - sum(keep.values())
    free = [k for k in sizes if k not in fixed] or list(sizes)
    if residual:
        big = max(free, key=lambda k: sizes[k])
        keep[big] = min(max(keep[big] + residual, 0), sizes[big])
    return keep


def masks_for(
    scores: dict[str, torch.Tensor],
    sparsity: float | dict[str, int],
    scope: str,
    scopes: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks for every layer's group scores under the chosen budget (``sparsity``: one
    model-wide target, or kept-group counts per layer for the row and layer scopes); ``scopes``
    overrides the row / layer scope of single layers."""
    if scope == "global":
        normed = {k: s / s.mean().clamp_min(1e-12) for k, s in scores.items()}
        flat = torch.cat([s.reshape(-1) for s in normed.values()])
        keep = round((1 - sparsity) * flat.numel())
        joint = keep_top(flat, keep)
        out, offset = {}, 0
        for k, s in normed.items():
            out[k] = joint[offset : offset + s.numel()].view_as(s)
            offset += s.numel()
        return out
    result = {}
    for k, s in scores.items():
        keep = sparsity[k] if isinstance(sparsity, dict) else round((1 - sparsity) * s.numel())
        result[k] = (
            row_mask(s, keep) if (scopes or {}).get(k, scope) == "row" else keep_top(s, keep)
        )
    return result


def parse_pins(pins: list[str], scope: str) -> list[tuple[str, float]]:
    """``pin`` entries "FQN_SUBSTRING:SPARSITY" as (substring, sparsity) pairs."""
    out = []
    for entry in pins:
        pattern, _, value = entry.rpartition(":")
        try:
            sp = float(value)
        except ValueError:
            sp = -1.0
        if not pattern or not 0.0 <= sp < 1.0:
            raise PassOptionError(
                f"pass 'group-prune': option 'pin' takes entries NAME:SPARSITY with sparsity in "
                f"[0, 1), e.g. [lm_head:0.5]; got {entry!r}"
            )
        out.append((pattern, sp))
    if out and scope == "global":
        raise PassOptionError(
            "pass 'group-prune': option 'pin' sets single layers' sparsity; use it with "
            "scope=row or scope=layer, not scope=global"
        )
    return out


def pinned_sparsities(
    pins: list[tuple[str, float]], sizes: dict[str, int], target: float
) -> tuple[dict[str, float], float]:
    """({fqn: pinned sparsity}, the sparsity the other layers then share so the model-wide
    target still holds). The first matching entry wins; every entry must match a layer."""
    pinned: dict[str, float] = {}
    for pattern, sp in pins:
        hits = [k for k in sizes if pattern in k]
        if not hits:
            raise PassOptionError(
                f"pass 'group-prune': pin '{pattern}' matches no compressible layer "
                f"(layers: {', '.join(list(sizes)[:4])}, ...)"
            )
        for k in hits:
            pinned.setdefault(k, sp)
    free = sum(n for k, n in sizes.items() if k not in pinned)
    if not free:
        raise PassOptionError(
            "pass 'group-prune': option 'pin' matches every compressible layer; leave some to "
            f"reach sparsity={target}"
        )
    rest = (target * sum(sizes.values()) - sum(sizes[k] * sp for k, sp in pinned.items())) / free
    if not 0.0 <= rest < 1.0:
        raise PassOptionError(
            f"pass 'group-prune': the pinned layers' sparsity leaves the others {rest:.3f} to "
            f"reach sparsity={target}, outside [0, 1)"
        )
    return pinned, rest


def output_deviation(
    model, samples: list[dict], reference: list[list], metric: str = "mse"
) -> float:
    """How far the model's float outputs on ``samples`` moved from ``reference``.

    mse: sum ||y' - y||^2 / sum ||y||^2.
    kl:  the mean over positions of KL(softmax(y) || softmax(y')) along the last axis, the outputs
         read as logits (a language model's next-token distribution)."""

    num = den = 0.0
    for x, ref in zip(samples, reference):
        for y, r in zip(model.run(x), ref):
            if not np.issubdtype(np.asarray(r).dtype, np.floating):
                continue
            y, r = np.asarray(y, np.float64), np.asarray(r, np.float64)
            if metric == "kl":  # the same KL as gqsa-train's loss=kd, in float64
                lr, ly = (torch.from_numpy(a).log_softmax(-1) for a in (r, y))
                num += float(nn_f.kl_div(ly, lr, log_target=True, reduction="sum"))
                den += float(r[..., 0].size)
            else:
                num += float(((y - r) ** 2).sum())
                den += float((r**2).sum())
    return num / max(den, 1e-30)


@register
class GroupPrune(Pass):
    """GQSA group pruning: zero the weakest 1 x g groups of each linear weight."""

    name = "group-prune"
    lossy = True

    @dataclass
    class Options:
        sparsity: float = 0.5
        group: int = 16
        score: Literal["magnitude", "wanda", "obs"] = "wanda"
        scope: Literal["row", "layer", "global"] = "row"
        skip: list[str] = field(default_factory=list)
        allocate: Literal["uniform", "sensitivity"] = "uniform"
        spread: float = 0.2
        sensitivity_samples: int = 1
        metric: Literal["mse", "kl"] = "mse"
        sequential: bool = False
        logit_weight: float = 0.0
        pin: list[str] = field(default_factory=list)

    def needs_calibration(self) -> bool:
        o = self.options
        return o.score != "magnitude" or o.allocate == "sensitivity" or o.logit_weight > 0

    def validate(self) -> None:
        o = self.options
        parse_pins(o.pin, o.scope)
        if not 0.0 <= o.sparsity < 1.0:
            raise PassOptionError(
                f"pass 'group-prune': option 'sparsity' must be in [0, 1), got {o.sparsity}"
            )
        if o.group < 1:
            raise PassOptionError(f"pass 'group-prune': option 'group' must be >= 1, got {o.group}")
        if o.sequential and (o.score == "magnitude" or o.scope == "global"):
            raise PassOptionError(
                "pass 'group-prune': sequential=true calibrates each block on the pruned blocks "
                "before it; use it with score=wanda or score=obs and scope=row or scope=layer"
            )
        if o.logit_weight < 0 or (o.logit_weight > 0 and o.scope == "global"):
            raise PassOptionError(
                "pass 'group-prune': option 'logit_weight' must be >= 0, and it weighs the logits "
                "layer's rows under scope=row or scope=layer, not scope=global"
            )
        if o.allocate == "sensitivity":
            if o.scope == "global":
                raise PassOptionError(
                    "pass 'group-prune': allocate=sensitivity sets each layer's sparsity; "
                    "use it with scope=row or scope=layer, not scope=global"
                )
            if not 0.0 < o.spread < 1.0 or o.sensitivity_samples < 1:
                raise PassOptionError(
                    "pass 'group-prune': option 'spread' must be in (0, 1) and "
                    "'sensitivity_samples' >= 1"
                )

    def run(self, model, ctx) -> PassResult:
        o = self.options
        stats: dict = {}
        sites = compressible_sites(model, o.skip, stats, o.group, f"group {o.group}")

        # a weight still in its external-data file is read through a copy-on-write map of it
        # (file pages, not memory), and that map is its original
        views = {s.fqn: file_view(s) for s in sites}
        weights = {
            s.fqn: read_weight(s).clone() if views[s.fqn] is None else views[s.fqn] for s in sites
        }

        row_weight = self._logit_weights(model, ctx, sites, stats) if o.logit_weight else {}
        scopes = {k: "layer" for k in row_weight}

        def score(k: str, stat) -> torch.Tensor:
            if o.score == "obs":
                s = obs_scores(weights[k], stat[0], stat[1], o.group)
            else:
                s = group_scores(weights[k], o.group, stat)
            return s * row_weight[k][:, None] if k in row_weight else s

        def prune(k: str, mask: torch.Tensor, stat) -> torch.Tensor:
            w = weights[k]
            if o.score == "obs":
                return obs_prune(w, stat, mask, o.group)
            out, inp = w.shape
            return (w.view(out, inp // o.group, o.group) * mask[:, :, None]).view(out, inp)

        def write(site, mask: torch.Tensor, w: torch.Tensor) -> None:  # w: dropped groups zero
            state = model.compression.site(site.fqn)
            if state.original is None:
                mapped = views[site.fqn] is not None
                state.original = weights[site.fqn] if mapped else weights[site.fqn].clone()
            write_weight(site, w)
            state.mask, state.group = mask, o.group

        sparsity: float | dict[str, int] = o.sparsity
        pins = parse_pins(o.pin, o.scope)
        groups = {k: w.numel() // o.group for k, w in weights.items()}
        if pins and o.allocate == "uniform":  # the other layers share what the pinned ones leave
            pinned, rest = pinned_sparsities(pins, groups, o.sparsity)
            each = {k: pinned.get(k, rest) for k in groups}
            sparsity = keep_counts(groups, each, o.sparsity, frozenset(pinned))
            stats["pin"] = {"layers": pinned, "others": round(rest, 4)}
        if not o.sequential or o.allocate == "sensitivity":  # statistics of the whole model
            needs_h = o.score == "obs" or o.allocate == "sensitivity"
            hess = hessians(model, sites, ctx.calibration) if needs_h else {}
            if o.score == "wanda":
                stat = activation_norms(model, sites, ctx.calibration)
            elif o.score == "obs":
                stat = {k: inverse_hessian_factor(h) for k, h in hess.items()}
            else:
                stat = dict.fromkeys(weights)
            scores = {k: score(k, stat[k]) for k in weights}
            if o.allocate == "sensitivity":
                sparsity = self._allocate(
                    model,
                    ctx,
                    sites,
                    scores,
                    lambda k, m: prune(k, m, stat[k]),
                    hess,
                    stats,
                    scopes,
                    pins,
                )
        if o.sequential:  # each block's scores and compensation on the already pruned blocks

            def compress(site, calibrated: torch.Tensor) -> None:  # a Hessian or column norms
                k = site.fqn
                st = inverse_hessian_factor(calibrated) if o.score == "obs" else calibrated
                budget = {k: sparsity[k]} if isinstance(sparsity, dict) else sparsity
                mask = masks_for({k: score(k, st)}, budget, o.scope, scopes)[k]
                write(site, mask, prune(k, mask, st))

            acc = HessianSum() if o.score == "obs" else ColumnNorms()
            stats["stages"] = compress_sequentially(
                model, sites, ctx.calibration, acc, compress, "group-prune"
            )
        else:
            masks = masks_for(scores, sparsity, o.scope, scopes)
            for site in sites:
                write(site, masks[site.fqn], prune(site.fqn, masks[site.fqn], stat[site.fqn]))
        pruned = total = 0
        for site in sites:
            mask = model.compression.sites[site.fqn].mask
            pruned += int((~mask).sum())
            total += mask.numel()
        stats.update(
            layers=len(sites),
            groups_pruned=pruned,
            groups_total=total,
            sparsity=round(pruned / max(total, 1), 6),
        )
        return PassResult(model, pruned > 0, stats)

    def _logit_weights(self, model, ctx, sites, stats) -> dict[str, torch.Tensor]:
        """{fqn of the logits layer: pbar^a per row} (logit_weight=a): pbar from the model's
        outputs on the calibration inputs."""
        if not ctx.calibration:
            raise InputError(
                "pass 'group-prune': logit_weight needs calibration inputs (--calib) and none "
                "were given"
            )
        pbar, count = None, 0
        for x in ctx.calibration:
            logits = next(
                (y for y in model.run(x) if np.issubdtype(np.asarray(y).dtype, np.floating)), None
            )
            if logits is None or np.ndim(logits) < 2:
                break
            flat = torch.from_numpy(np.asarray(logits)).reshape(-1, np.shape(logits)[-1])
            p = flat.double().softmax(-1).sum(0)
            pbar, count = (p if pbar is None else pbar + p), count + flat.shape[0]
        heads = [s for s in sites if pbar is not None and s.out_features == pbar.numel()]
        if len(heads) != 1:
            raise UnsupportedError(
                "pass 'group-prune': logit_weight needs the one compressible layer that computes "
                f"the model's output logits; {len(heads)} of the layers have as many outputs as "
                "the model's first float output has entries on its last axis"
            )
        pbar = pbar / count
        weight = (pbar.clamp_min(1e-30) ** self.options.logit_weight).float()
        top = pbar.sort(descending=True).values
        stats["logit_weight"] = {
            "layer": heads[0].fqn,
            "exponent": self.options.logit_weight,
            "positions": count,
            "mass_of_top_1pct_tokens": round(float(top[: max(1, top.numel() // 100)].sum()), 4),
        }
        return {heads[0].fqn: weight}

    def _allocate(
        self, model, ctx, sites, scores, pruned_weight, hess, stats, scopes, pins
    ) -> dict[str, int]:
        """Kept groups per layer from each layer's sensitivity (allocate=sensitivity); pinned
        layers keep their sparsity and the others share the rest of the budget."""
        o = self.options
        samples = ctx.calibration[: o.sensitivity_samples]
        target = min(o.sparsity, 0.99)  # the grid's middle point, clipped like the others
        grid = sorted({min(max(target + d, 0.0), 0.99) for d in (-o.spread, 0.0, o.spread)})
        sizes = {k: s.numel() for k, s in scores.items()}
        pinned, rest = pinned_sparsities(pins, sizes, o.sparsity) if pins else ({}, target)
        if not grid[0] - 1e-9 <= rest <= grid[-1] + 1e-9:  # before any measurement
            raise PassOptionError(
                f"pass 'group-prune': the pinned layers ({', '.join(pinned)}) leave the others "
                f"{rest:.3f} sparsity on average, outside the allocation's range "
                f"{grid[0]:.2f}-{grid[-1]:.2f} (target +- spread={o.spread}); pin them closer to "
                "the target or widen the spread"
            )
        reference = [model.run(x) for x in samples]
        curves: dict[str, list[tuple[float, float]]] = {k: [(sp, 0.0)] for k, sp in pinned.items()}
        measured: dict[str, float] = {}
        free = [site for site in sites if site.fqn not in pinned]
        progress, task = bar(len(free), "group-prune: layer sensitivity")
        with progress:
            for site in free:
                k, s = site.fqn, scores[site.fqn]
                original = read_weight(site).clone()
                local = {}
                for sp in grid:
                    w = pruned_weight(k, masks_for({k: s}, sp, o.scope, scopes)[k])
                    local[sp] = layer_error(original, w, hess[k])
                    if sp == target:
                        write_weight(site, w)
                        measured[k] = output_deviation(model, samples, reference, o.metric)
                write_weight(site, original)
                scale = measured[k] / max(local[target], 1e-30)
                curves[k] = [(sp, scale * e) for sp, e in local.items()]
                progress.advance(task)
        keep = keep_counts(
            sizes, allocate(curves, sizes, o.sparsity), o.sparsity, frozenset(pinned)
        )
        stats["allocation"] = {
            "grid": grid,
            "samples": len(samples),
            "metric": o.metric,
            "layer_sparsity": {k: round(1 - keep[k] / sizes[k], 4) for k in scores},
            "pinned": pinned,
            "output_deviation_at_target": {k: float(f"{v:.4g}") for k, v in measured.items()},
        }
        return keep
