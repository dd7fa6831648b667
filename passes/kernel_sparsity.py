"""kernel-sparsity: SparseByteNN's fine-grained kernel sparsity for convolutional networks, a
sparsity pattern chosen per operator type (between unstructured and channel pruning).

Every weight site is viewed as a matrix M = W.reshape(out, in/groups * k), the columns in
(input channel, kernel row, kernel column) order, the order of the unfolded patches (im2col) and
of an NHWC kernel's reduction. A pattern is a block shape over M:

    RxC     R consecutive output channels x C consecutive columns: ``4x1`` is four output
            channels at one input channel (for a 1x1 conv or a linear: the SIMD lanes of an NHWC
            kernel over output channels; for a KxK conv: one kernel position of four output
            channels), ``1x4`` four input channels of one output channel
    kernel  one whole k x k kernel of one (output, input) channel pair (1 x k*k)
    dense   left alone

``patterns`` maps operator types to patterns: ``pointwise`` (1x1 conv), ``linear``, ``conv``
(a KxK conv, grouped or not) and ``depthwise`` (groups == channels; dense unless asked: its
weights are 1% of MobileNetV2's and its cost is memory traffic, not arithmetic). A block never
crosses a conv group; a layer whose dimensions the block does not divide stays dense and the
report says why.

Scores (per block, summed over its weights): ``magnitude`` |W|; ``wanda`` |W| * ||X_col|| with
X the layer's unfolded calibration inputs; ``obs`` W^2 / [H^-1]_jj (optimal brain surgeon
saliency) and the pruned weights' loss compensated in the kept ones (the SparseGPT sweep of
group-prune, with the block pattern as its mask), per conv group.

A layer whose output goes straight into an inference BatchNorm is scored as the network uses it:
every output channel's scores are multiplied by BatchNorm's factor |gamma| / sqrt(var + eps)
(squared for obs), so the kept blocks are the ones the BN-folded layer would keep (a raw weight
ten times smaller may feed a channel BatchNorm scales ten times up). The reported output errors
are after that factor too.

``sequential=true`` (score=obs) prunes the layers one by one in graph order, each on the inputs
the already pruned layers give it (Xp), against what the dense layer computes on the dense inputs
(Xd): its weight is first solved for W0 = (W Xd^T Xp + l W)(Xp^T Xp + l I)^-1 (a ridge towards W,
so W0 = W when nothing upstream changed) and W0 is then pruned with OBS on Xp's Hessian. Each
layer so corrects what the layers before it lost, at the cost of one partial forward of the dense
and of the pruned model per layer and calibration input; the layer's reported output error is
||W Xd - W' Xp||^2 / ||W Xd||^2.

Budget: ``sparsity`` is the fraction of the eligible weights (the layers whose pattern is not
dense) set to zero, model-wide. ``allocate=uniform`` gives each layer that sparsity;
``allocate=sensitivity`` measures, for every layer, the deviation of the whole model's outputs
(relative squared error on the calibration inputs) when that layer alone is pruned at
``sparsity - spread``, ``sparsity`` and ``sparsity + spread``, and spends the budget where it
costs the least deviation per pruned weight (the lower-convex-hull walk of group-prune). Either
way the kept blocks are corrected so the model-wide count of zeroed weights is
round(sparsity * eligible) to within half of the largest layer's block. The report lists each
layer's operator type, pattern, sparsity and measured error (relative weight error, and with
calibration the layer's relative output error tr(dW H dW^T) / tr(W H W^T) on its inputs).

Kept weights are recorded as the site's ``element_mask`` (the weight's own shape), ``block``
and ``pattern`` in the compression state, with the original weight.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from effc.errors import PassOptionError
from effc.ir.calibrate import site_input
from effc.ir.reducers import activation_norms, hessians
from effc.ir.sites import WeightSite, read_weight, weight_sites, write_weight
from effc.pass_base import Pass, PassResult
from effc.passes._channels import output_scales
from effc.passes._obs import inverse_hessian_factor, obs_prune
from effc.passes.group_prune import allocate, keep_top, output_deviation
from effc.progress import bar
from effc.registry import register

OP_TYPES = ("pointwise", "linear", "conv", "depthwise")
DEFAULT_PATTERNS = ["pointwise:4x1", "linear:4x1", "conv:kernel", "depthwise:dense"]
_BLOCK = re.compile(r"^(\d+)x(\d+)$")


def op_type(site: WeightSite) -> str:
    """pointwise | linear | conv | depthwise."""
    if site.op == "linear":
        return "linear"
    if site.groups > 1 and site.shape[1] == 1 and site.groups == site.shape[0]:
        return "depthwise"
    if all(k == 1 for k in site.shape[2:]):
        return "pointwise" if site.groups == 1 else "conv"
    return "conv"


def parse_patterns(entries: list[str]) -> dict[str, str]:
    """``["pointwise:4x1", ...]`` over the defaults; raises PassOptionError on a bad entry."""
    out = dict(p.split(":") for p in DEFAULT_PATTERNS)
    for entry in entries:
        kind, _, pattern = entry.partition(":")
        m = _BLOCK.match(pattern)
        if kind not in OP_TYPES or not (
            pattern in ("dense", "kernel") or (m and int(m[1]) >= 1 and int(m[2]) >= 1)
        ):
            raise PassOptionError(
                f"pass 'kernel-sparsity': option 'patterns' takes entries OPTYPE:PATTERN with "
                f"OPTYPE one of {', '.join(OP_TYPES)} and PATTERN dense, kernel or RxC "
                f"(e.g. pointwise:4x1, conv:kernel); got {entry!r}"
            )
        out[kind] = pattern
    return out


def block_shape(site: WeightSite, pattern: str) -> tuple[int, int] | str:
    """The (rows, cols) block over the site's matrix view, or why it stays dense."""
    if pattern == "dense":
        return "pattern dense"
    k = math.prod(site.shape[2:])
    cols = site.shape[1] * k
    block = (1, k) if pattern == "kernel" else tuple(int(v) for v in pattern.split("x"))
    rows_per_group = site.shape[0] // site.groups
    if rows_per_group % block[0] or cols % block[1]:
        return f"{pattern} does not divide ({rows_per_group} rows per group, {cols} columns)"
    return block


def block_sums(e: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(O, K) per-weight values -> (O/R, K/C) sums over the blocks."""
    r, c = block
    o, k = e.shape
    return e.view(o // r, r, k // c, c).sum((1, 3))


def expand(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    return mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


def exact_counts(
    blocks: dict[str, int], sizes: dict[str, int], sparsities: dict[str, float], target: float
) -> dict[str, int]:
    """Kept blocks per layer for per-layer sparsities, corrected so the zeroed weights sum to
    round(target * weights) within half the largest layer's block (the residual goes there)."""
    keep = {k: round((1 - sparsities[k]) * n) for k, n in blocks.items()}
    weights = sum(blocks[k] * sizes[k] for k in blocks)
    residual = round((1 - target) * weights) - sum(keep[k] * sizes[k] for k in blocks)
    big = max(blocks, key=lambda k: blocks[k] * sizes[k])
    keep[big] = min(max(keep[big] + round(residual / sizes[big]), 0), blocks[big])
    return keep


def _sequential_error(site, weight, pruned: torch.Tensor, hp, hd, c) -> float:
    """||W Xd - W' Xp||^2 / ||W Xd||^2 summed over conv groups, from Hp = Xp^T Xp, Hd = Xd^T Xd
    and C = Xp^T Xd (the common factor 2 / rows cancels)."""
    g = site.groups
    w = weight.double().view(g, site.shape[0] // g, -1)
    p = pruned.double().view_as(w)
    dense = ((w @ hd) * w).sum()
    err = dense - 2 * ((p @ c) * w).sum() + ((p @ hp) * p).sum()
    return float(err / dense.clamp_min(1e-30))


def _relative(d: torch.Tensor, w: torch.Tensor) -> float:
    return float((d.double() ** 2).sum() / (w.double() ** 2).sum().clamp_min(1e-30))


@dataclass
class _Layer:
    site: WeightSite
    kind: str
    block: tuple[int, int]
    weight: torch.Tensor  # (O, K)
    importance: torch.Tensor  # (O, K) per-weight score
    stat: object = None  # per-group (U, dead) factors (obs) or the Hessians (error)

    @property
    def blocks(self) -> int:
        return self.weight.numel() // (self.block[0] * self.block[1])

    @property
    def block_size(self) -> int:
        return self.block[0] * self.block[1]


@register
class KernelSparsity(Pass):
    """SparseByteNN kernel sparsity: per-operator block patterns for convs and linears."""

    name = "kernel-sparsity"
    lossy = True

    @dataclass
    class Options:
        sparsity: float = 0.5
        patterns: list[str] = field(default_factory=list)
        score: Literal["magnitude", "wanda", "obs"] = "magnitude"
        allocate: Literal["uniform", "sensitivity"] = "uniform"
        spread: float = 0.2
        sensitivity_samples: int = 2
        skip: list[str] = field(default_factory=list)
        sequential: bool = False

    def needs_calibration(self) -> bool:
        return self.options.score != "magnitude" or self.options.allocate == "sensitivity"

    def validate(self) -> None:
        o = self.options
        parse_patterns(o.patterns)
        if not 0.0 <= o.sparsity < 1.0:
            raise PassOptionError(
                f"pass 'kernel-sparsity': option 'sparsity' must be in [0, 1), got {o.sparsity}"
            )
        if not 0.0 < o.spread < 1.0 or o.sensitivity_samples < 1:
            raise PassOptionError(
                "pass 'kernel-sparsity': option 'spread' must be in (0, 1) and "
                "'sensitivity_samples' >= 1"
            )
        if o.sequential and o.score != "obs":
            raise PassOptionError(
                "pass 'kernel-sparsity': sequential=true solves each layer for the dense model's "
                f"outputs with OBS; use score=obs (got score={o.score})"
            )

    def run(self, model, ctx) -> PassResult:
        o = self.options
        patterns = parse_patterns(o.patterns)
        layers: list[_Layer] = []
        dense: dict[str, str] = {}
        for site in weight_sites(model):
            if any(p in site.fqn for p in o.skip):
                dense[site.fqn] = "skipped"
                continue
            kind = op_type(site)
            block = block_shape(site, patterns[kind])
            if isinstance(block, str):
                dense[site.fqn] = f"{kind}: {block}"
                continue
            w = read_weight(site).float().reshape(site.shape[0], -1).clone()
            layers.append(_Layer(site, kind, block, w, w.abs()))
        stats: dict = {"patterns": patterns, "dense_layers": dense}
        if not layers:
            stats.update(layers=0, sparsity=0.0)
            return PassResult(model, False, stats)

        sites = [la.site for la in layers]
        calibrated = bool(ctx.calibration) and self.needs_calibration()
        whole = calibrated and not (o.sequential and o.allocate == "uniform")
        hess = hessians(model, sites, ctx.calibration) if whole else {}
        teacher = copy.deepcopy(model) if o.sequential else None
        self._teacher_sites = {t.fqn: t for t in weight_sites(teacher)} if teacher else {}
        self._hess, self._patterns = hess, patterns
        norms = activation_norms(model, sites, ctx.calibration) if o.score == "wanda" else {}
        scales = output_scales(model)
        for la in layers:
            if o.score == "wanda":
                g = la.site.groups if la.site.op == "conv" else 1
                n = norms[la.site.fqn].reshape(g, -1)
                rows = la.site.shape[0] // g
                la.importance = la.weight.abs() * n.repeat_interleave(rows, 0)
            elif o.score == "obs" and la.site.fqn in hess:
                self._obs_importance(la, la.weight, hess[la.site.fqn])
            if la.site.fqn in scales:
                s = scales[la.site.fqn][:, None]
                la.importance = la.importance * (s * s if o.score == "obs" else s)
        stats["batchnorm_scaled"] = sum(la.site.fqn in scales for la in layers)
        scores = {la.site.fqn: block_sums(la.importance, la.block) for la in layers}

        blocks = {la.site.fqn: la.blocks for la in layers}
        sizes = {la.site.fqn: la.block_size for la in layers}
        if o.allocate == "sensitivity":
            chosen = self._allocate(model, ctx, layers, scores, stats)
        else:
            chosen = dict.fromkeys(blocks, o.sparsity)
        keep = exact_counts(blocks, sizes, chosen, o.sparsity)

        per_layer, zeroed, total = {}, 0, 0
        what = "kernel-sparsity: " + ("sequential" if o.sequential else "prune")
        progress, task = bar(len(layers), what)
        with progress:
            for la in layers:
                entry = self._prune_layer(model, ctx, la, scores, keep, teacher, scales)
                per_layer[la.site.fqn] = entry
                kept = model.compression.site(la.site.fqn).element_mask
                zeroed += int((~kept).sum())
                total += kept.numel()
                progress.advance(task)
        if o.sequential:
            stats["sequential"] = {"layers": len(layers), "samples": len(ctx.calibration)}
        stats.update(
            layers=len(layers),
            weights_eligible=total,
            weights_zeroed=zeroed,
            sparsity=round(zeroed / total, 6),
            per_layer=per_layer,
        )
        return PassResult(model, zeroed > 0, stats)

    def _obs_importance(self, la: _Layer, weight: torch.Tensor, hessian: torch.Tensor) -> None:
        """OBS saliencies W^2 / [H^-1]_jj of ``weight`` per conv group (the factors kept in
        ``la.stat`` for the compensation)."""
        g, rows = la.site.groups, la.site.shape[0] // la.site.groups
        h = hessian.reshape(-1, *hessian.shape[-2:])
        la.stat = [inverse_hessian_factor(h[i]) for i in range(g)]
        d = torch.stack([torch.diag(u) ** 2 for u, _ in la.stat])
        e = weight**2 / d.repeat_interleave(rows, 0)
        for i, (_, dead) in enumerate(la.stat):
            e[i * rows : (i + 1) * rows, dead] = 0
        la.importance = e

    def _sequential_target(self, model, ctx, la: _Layer, teacher) -> tuple:
        """The weight that, on the inputs the already pruned layers give this layer (Xp), best
        reproduces the dense layer on the dense inputs (Xd): W0 = W Xd^T Xp (Xp^T Xp)^-1 per conv
        group, and Hp = 2 Xp^T Xp / rows, Hd, C = 2 Xp^T Xd / rows for the error."""
        site = la.site
        t_site = self._teacher_sites[site.fqn]
        hp = hd = c = None
        rows = 0
        for x in ctx.calibration:
            xd = site_input(teacher, t_site, x)
            xp = site_input(model, site, x)
            xd, xp = (v if v.dim() == 3 else v[None] for v in (xd, xp))
            xd, xp = xd.double(), xp.double()
            parts = (xp.transpose(1, 2) @ xp, xd.transpose(1, 2) @ xd, xp.transpose(1, 2) @ xd)
            hp, hd, c = parts if hp is None else (a + b for a, b in zip((hp, hd, c), parts))
            rows += xp.shape[1]
        hp, hd, c = (2 * v / rows for v in (hp, hd, c))
        g, out = site.groups, site.shape[0] // site.groups
        w = la.weight.double().view(g, out, -1)
        # ridge towards W, not towards zero: (W C^T + l W)(Hp + l I)^-1 is W itself when the
        # inputs are unchanged, and directions calibration never excites keep W's values
        dead = (hp.diagonal(dim1=1, dim2=2) == 0).double()
        lam = 0.01 * hp.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
        reg = torch.diag_embed(lam[:, None] * torch.ones_like(dead) + dead)
        w0 = torch.linalg.solve(hp + reg, (c + reg) @ w.transpose(1, 2)).transpose(1, 2)
        return w0.reshape(la.weight.shape).float(), hp, hd, c

    def _prune_layer(self, model, ctx, la: _Layer, scores, keep, teacher, scales) -> dict:
        o = self.options
        k = la.site.fqn
        if o.sequential:
            w0, hp, hd, c = self._sequential_target(model, ctx, la, teacher)
            self._obs_importance(la, w0, hp.float())
            if k in scales:
                s = scales[k][:, None]
                la.importance = la.importance * s * s
            mask = keep_top(block_sums(la.importance, la.block), keep[k])
            pruned = self._pruned(la, mask, w0)
        else:
            mask = keep_top(scores[k], keep[k])
            pruned = self._pruned(la, mask)
        state = model.compression.site(k)
        if state.original is None:
            state.original = read_weight(la.site).clone()
        write_weight(la.site, pruned.reshape(la.site.shape))
        state.element_mask = expand(mask, la.block).reshape(la.site.shape)
        state.block, state.pattern = la.block, self._patterns[la.kind]
        entry = {
            "op": la.kind,
            "pattern": self._patterns[la.kind],
            "sparsity": round(1 - keep[k] / la.blocks, 4),
            "weight_error": float(f"{_relative(pruned - la.weight, la.weight):.4g}"),
        }
        # errors after the BatchNorm that follows (if any): the units the network sees
        s = scales[k][:, None] if k in scales else 1.0
        w, p = la.weight * s, pruned * s
        if o.sequential:  # ||W Xd - W' Xp||^2 / ||W Xd||^2: the dense layer on dense inputs
            entry["output_error"] = float(f"{_sequential_error(la.site, w, p, hp, hd, c):.4g}")
        elif k in self._hess:
            err = self._output_error(la.site, w, p, self._hess[k])
            entry["output_error"] = float(f"{err:.4g}")
        return entry

    def _pruned(self, la: _Layer, mask: torch.Tensor, weight=None) -> torch.Tensor:
        """The (O, K) ``weight`` (the layer's own by default) with the dropped blocks zero
        (OBS-compensated with score=obs)."""
        weight = la.weight if weight is None else weight
        kept = expand(mask, la.block)
        if self.options.score != "obs":
            return weight * kept
        rows = la.site.shape[0] // la.site.groups
        out = torch.empty_like(weight)
        for i, factor in enumerate(la.stat):
            sl = slice(i * rows, (i + 1) * rows)
            out[sl] = obs_prune(weight[sl], factor, kept[sl], 1)
        return out

    @staticmethod
    def _output_error(site, weight, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
        """tr(dW H dW^T) / tr(W H W^T) summed over the conv groups."""
        h = hessian.reshape(-1, *hessian.shape[-2:]).double()
        rows = site.shape[0] // site.groups
        d = (pruned - weight).double().view(site.groups, rows, -1)
        w = weight.double().view(site.groups, rows, -1)
        num = ((d @ h) * d).sum()
        return float(num / ((w @ h) * w).sum().clamp_min(1e-30))

    def _allocate(self, model, ctx, layers, scores, stats) -> dict[str, float]:
        """Per-layer sparsity from each layer's measured effect on the model's outputs."""
        o = self.options
        samples = ctx.calibration[: o.sensitivity_samples]
        reference = [model.run(x) for x in samples]
        grid = sorted({min(max(o.sparsity + d, 0.0), 0.95) for d in (-o.spread, 0.0, o.spread)})
        curves: dict[str, list[tuple[float, float]]] = {}
        progress, task = bar(len(layers), "kernel-sparsity: layer sensitivity")
        with progress:
            for la in layers:
                k = la.site.fqn
                original = read_weight(la.site).clone()
                curves[k] = []
                for sp in grid:
                    mask = keep_top(scores[k], round((1 - sp) * la.blocks))
                    write_weight(la.site, self._pruned(la, mask).reshape(la.site.shape))
                    dev = output_deviation(model, samples, reference)
                    curves[k].append((sp, dev))
                write_weight(la.site, original)
                progress.advance(task)
        weights = {la.site.fqn: la.weight.numel() for la in layers}
        chosen = allocate(curves, weights, o.sparsity)
        stats["allocation"] = {
            "grid": grid,
            "samples": len(samples),
            "metric": "relative squared output error",
            "layer_sparsity": {k: round(v, 4) for k, v in chosen.items()},
            "output_deviation": {k: [float(f"{d:.4g}") for _, d in c] for k, c in curves.items()},
        }
        return chosen
