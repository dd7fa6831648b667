"""group-prune: GQSA's group-structured pruning of 1 x g groups along each row's input dimension.

Scores (per group, summed over its g weights):
    magnitude:  sum_j |W[r, j]|
    wanda:      sum_j |W[r, j]| * ||X[:, j]||_2      (activation-aware, from calibration inputs)
Budgets keep exactly round((1 - sparsity) * groups) groups:
    row:    the same count in every row (the tail of the division spread one per row);
    layer:  the best groups of each layer, rows may differ;
    global: the best groups of all layers, scores normalised by each layer's mean score.
Pruned groups are written as zeros and the keep-mask is recorded in the model's annotations
(``annotations[fqn]["mask"]``, shape (out, in/g)) for quantization and the BSR packer, with the
uncompressed weight (``"original"``) that training passes use as their teacher. A tied

lm_head is untied first, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from effc.errors import PassOptionError, UnsupportedError
from effc.pass_base import Pass, PassResult, register


def group_scores(
    weight: torch.Tensor, group: int, act_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """(out, in) weight -> (out, in/g) group scores."""
    w = weight.abs().float()
    if act_norm is not None:
        w = w * act_norm.float()[None, :]
    out, inp = w.shape
    return w.view(out, inp // group, group).sum(-1)


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
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


def masks_for(
    scores: dict[str, torch.Tensor], sparsity: float, scope: str
) -> dict[str, torch.Tensor]:
    """Keep-masks for every layer's group scores under the chosen budget."""
    if scope == "global":
        normed = {k: s / s.mean().clamp_min(1e-12) for k, s in scores.items()}
        flat = torch.cat([s.reshape(-1) for s in normed.values()])
        keep = round((1 - sparsity) * flat.numel())
        joint = _keep_top(flat, keep)
        out, offset = {}, 0
        for k, s in normed.items():
            out[k] = joint[offset : offset + s.numel()].view_as(s)
            offset += s.numel()
        return out
    result = {}
    for k, s in scores.items():
        keep = round((1 - sparsity) * s.numel())
        result[k] = row_mask(s, keep) if scope == "row" else _keep_top(s, keep)
    return result


def compressible_sites(model, skip: list[str], stats: dict, divisor: int, what: str) -> list:
    """Linear weight sites not matched by ``skip`` (FQN substrings), tied ones untied first (and
    listed in ``stats``); every input size must be a multiple of ``divisor`` (``what`` names it)."""
    from effc.ir.sites import untie, weight_sites

    def linear_sites():
        return [
            s for s in weight_sites(model) if s.op == "linear" and not any(p in s.fqn for p in skip)
        ]

    sites = linear_sites()
    untied = [s.fqn for s in sites if untie(model, s)]
    if untied:
        stats["untied"] = untied
        sites = linear_sites()
    bad = [s.fqn for s in sites if s.in_features % divisor]
    if bad:
        raise UnsupportedError(
            f"{what} does not divide the input size of {bad[0]} ({len(bad)} layers)"
        )
    return sites


def activation_norms(model, sites, ctx) -> dict[str, torch.Tensor]:
    """Per-site ||X[:, j]||_2 over the calibration inputs."""
    from effc.ir.calibrate import collect_site_inputs

    sq: dict[str, torch.Tensor] = {}

    def accumulate(site, x):
        s = (x.double() ** 2).sum(0)
        sq[site.fqn] = sq[site.fqn] + s if site.fqn in sq else s

    collect_site_inputs(model, sites, ctx.calibration, accumulate)
    return {k: v.sqrt().float() for k, v in sq.items()}


@register
class GroupPrune(Pass):
    """GQSA group pruning: zero the weakest 1 x g groups of each linear weight."""

    name = "group-prune"
    lossy = True

    @dataclass
    class Options:
        sparsity: float = 0.5
        group: int = 16
        score: Literal["magnitude", "wanda"] = "wanda"
        scope: Literal["row", "layer", "global"] = "row"
        skip: list[str] = field(default_factory=list)

    def validate(self) -> None:
        o = self.options
        if not 0.0 <= o.sparsity < 1.0:
            raise PassOptionError(
                f"pass 'group-prune': option 'sparsity' must be in [0, 1), got {o.sparsity}"
            )
        if o.group < 1:
            raise PassOptionError(f"pass 'group-prune': option 'group' must be >= 1, got {o.group}")

    def run(self, model, ctx) -> PassResult:
        o = self.options
        stats: dict = {}
        sites = compressible_sites(model, o.skip, stats, o.group, f"group {o.group}")
        norms = activation_norms(model, sites, ctx) if o.score == "wanda" else {}
        from effc.ir.sites import read_weight, write_weight

        weights = {s.fqn: read_weight(s).clone() for s in sites}
        scores = {k: group_scores(w, o.group, norms.get(k)) for k, w in weights.items()}
        masks = masks_for(scores, o.sparsity, o.scope)
        pruned = total = 0
        for site in sites:
            mask = masks[site.fqn]
            w = weights[site.fqn]
            out, inp = w.shape
            w.view(out, inp // o.group, o.group).mul_(mask[:, :, None].to(w.dtype))
            model.annotations.setdefault(site.fqn, {}).setdefault(
                "original", read_weight(site).clone()
            )
            write_weight(site, w)

            model.annotations.setdefault(site.fqn, {}).update(mask=mask, group=o.group)
            pruned += int((~mask).sum())
            total += mask.numel()
        stats.update(
            layers=len(sites),
            groups_pruned=pruned,
            groups_total=total,
            sparsity=round(pruned / max(total, 1), 6),
        )
        return PassResult(model, pruned > 0, stats)
