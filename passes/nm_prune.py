"""nm-prune: N:M semi-structured pruning (keep N of every M consecutive input weights per row),
the 2:4 baseline GQSA compares against. Scores are magnitude |W|, Wanda |W| * ||X_j|| or obs
(SparseGPT: W^2 / U_jj^2 from the calibration Hessian, and the pruned weights' loss compensated in
the kept ones, the same sweep as group-prune{score=obs})."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from effc.errors import PassOptionError
from effc.ir.calibrate import compress_sequentially
from effc.ir.reducers import ColumnNorms, HessianSum, activation_norms, hessians
from effc.ir.sites import compressible_sites, file_view, read_weight, write_weight
from effc.pass_base import Pass, PassResult
from effc.passes._obs import inverse_hessian_factor, obs_prune, obs_scores
from effc.registry import register


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(out, in) scores -> keep-mask with exactly n kept in every m consecutive inputs."""
    out, inp = scores.shape
    s = scores.reshape(out, inp // m, m)
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask.scatter_(2, s.topk(n, dim=2).indices, True)
    return mask.view(out, inp)


@register
class NMPrune(Pass):
    """N:M pruning (2:4 by default), magnitude or Wanda scores."""

    name = "nm-prune"
    lossy = True

    @dataclass
    class Options:
        n: int = 2
        m: int = 4
        score: Literal["magnitude", "wanda", "obs"] = "magnitude"
        skip: list[str] = field(default_factory=list)
        sequential: bool = False  # wanda, obs: calibrate each block on the already pruned ones

    def needs_calibration(self) -> bool:
        return self.options.score != "magnitude"

    def validate(self) -> None:
        if not 0 < self.options.n < self.options.m:
            raise PassOptionError(
                f"pass 'nm-prune': need 0 < n < m, got n={self.options.n}, m={self.options.m}"
            )
        if self.options.sequential and self.options.score == "magnitude":
            raise PassOptionError(
                "pass 'nm-prune': sequential=true calibrates each block on the pruned blocks "
                "before it; use it with score=wanda or score=obs"
            )

    def run(self, model, ctx) -> PassResult:
        o = self.options
        stats: dict = {}
        sites = compressible_sites(model, o.skip, stats, o.m, f"m={o.m}")

        def prune(site, stat) -> None:  # stat: the Hessian (obs), column norms (wanda) or None
            view = file_view(site)  # still in its external-data file: mapped, not copied
            w = read_weight(site).clone() if view is None else view
            if o.score == "obs":
                factor = inverse_hessian_factor(stat)
                keep = nm_mask(obs_scores(w, *factor, 1), o.n, o.m)
                write_weight(site, obs_prune(w, factor, keep, 1))
            else:
                keep = nm_mask(w.abs() * (stat[None, :] if stat is not None else 1), o.n, o.m)
                write_weight(site, w * keep)
            # the element mask and the weight before pruning, for gqsa-train{stage=bqpo}
            state = model.compression.site(site.fqn)
            if state.original is None:
                state.original = w
            state.element_mask = keep

        if o.sequential:  # each block's scores and compensation on the already pruned blocks
            acc = HessianSum() if o.score == "obs" else ColumnNorms()
            stats["stages"] = compress_sequentially(
                model, sites, ctx.calibration, acc, prune, "nm-prune"
            )
        else:
            stat = (
                hessians(model, sites, ctx.calibration)
                if o.score == "obs"
                else activation_norms(model, sites, ctx.calibration)
                if o.score == "wanda"
                else {}
            )
            for site in sites:
                prune(site, stat.pop(site.fqn, None))
        stats.update(layers=len(sites), sparsity=round(1 - o.n / o.m, 6))
        return PassResult(model, bool(sites), stats)
