"""Calibration reducers: per-site statistics of the activations a weight site sees, accumulated
on the fly (``fn`` of ``effc.ir.calibrate.collect_site_inputs``), so no activation is kept.

``x`` is (rows, in) for a linear site; for a convolution it is (groups, rows, in/groups * kh *
kw), the unfolded patches of each group (``effc.ir.calibrate`` unfolds them), so every statistic
is per conv group: a depthwise conv has one kh*kw Hessian per channel.
"""

from __future__ import annotations

import torch

from effc import distributed
from effc.ir.calibrate import collect_site_inputs


class HessianSum:
    """Accumulates each site's H = 2 X^T X / rows over calibration activations (``fn`` of
    ``collect_site_inputs``); sites that share one input (q/k/v, gate/up) share one product."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.last: list = [None, None]  # (input, its X^T X)

    def __call__(self, site, x: torch.Tensor) -> None:
        prev = self.last[0]
        if prev is not None and prev.data_ptr() == x.data_ptr() and prev.shape == x.shape:
            h = self.last[1]
        else:
            h = (x.transpose(-1, -2) @ x).double()  # fp32 GEMM, accumulated in fp64
            self.last[:] = [x, h]
        k = site.fqn
        self.sums[k] = self.sums[k] + h if k in self.sums else h.clone()
        self.rows[k] = self.rows.get(k, 0) + x.shape[-2]

    def pop(self, fqn: str) -> torch.Tensor:
        """The site's Hessian, forgotten here (and the shared product, so memory stays low);
        summed over processes when distributed (``effc.distributed``)."""
        self.last[:] = [None, None]
        total = distributed.sum_(self.sums.pop(fqn))
        rows = distributed.sum_(torch.tensor([self.rows.pop(fqn)], dtype=torch.float64))
        return (2 * total / rows).float()


def hessians(model, sites, inputs) -> dict[str, torch.Tensor]:
    """Per-site H = 2 X^T X / rows over the calibration ``inputs``."""
    acc = HessianSum()
    collect_site_inputs(model, sites, distributed.shard(inputs), acc)
    return {s.fqn: acc.pop(s.fqn) for s in sites}


class ColumnNorms:
    """Accumulates each site's squared input column norms (``fn`` of ``collect_site_inputs``)."""

    def __init__(self):
        self.sq: dict[str, torch.Tensor] = {}

    def __call__(self, site, x: torch.Tensor) -> None:
        s = (x.double() ** 2).sum(-2)
        self.sq[site.fqn] = self.sq[site.fqn] + s if site.fqn in self.sq else s

    def pop(self, fqn: str) -> torch.Tensor:
        """The site's ||X[:, j]||_2, forgotten here (over every process's inputs)."""
        return distributed.sum_(self.sq.pop(fqn)).sqrt().float()


def activation_norms(model, sites, inputs) -> dict[str, torch.Tensor]:
    """Per-site ||X[:, j]||_2 over the calibration ``inputs``."""
    acc = ColumnNorms()
    collect_site_inputs(model, sites, distributed.shard(inputs), acc)
    return {s.fqn: acc.pop(s.fqn) for s in sites}
