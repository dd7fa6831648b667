"""share-blocks: FoldGPT's group parameter sharing. Consecutive transformer blocks are grouped
(``group`` blocks each, the last group may be smaller); inside a group every block's linear
weights become one shared ``nn.Parameter``, while each block keeps its own norms, its own biases
(a BERT's; a few hundred numbers a layer, as cheap to keep as the norms, and what the ONNX form
keeps, since there a bias is an Add after the weight's MatMul) and anything else that is not a
linear weight, all of which a cure fine-tune re-adapts.

``choose``: ``first`` shares the first block's weights; ``mean`` shares the element-wise mean
of the group's weights; ``fit`` (needs calibration inputs) shares the weight whose outputs are
closest, in least squares over the calibration activations each block's layer sees, to every
block's own: W = (sum_i W_i H_i + d W_mean)(sum_i H_i + d I)^-1, with H_i = X_i^T X_i the
layer's input Hessian in block i, measured once on the model before sharing, and d a small
damping. ``fit`` reports the relative output error sum_i ||X_i (W - W_i)^T||^2 / ||X_i
W_i^T||^2 of each weight in each block (mean and max; ``first`` and ``mean`` have no
calibration to measure it on). ``sequential=true`` (with ``fit``) fits group by group, each on
the activations of the model with the groups before it already shared, as GPTQ compresses layer
by layer: a later group's fit absorbs part of what sharing the earlier ones changed, at one
calibration run per group instead of one in all. Memory: the one-run fit holds every shared
layer's Hessian at once (about 1 GB a LLaMA-7B block in float32), the sequential fit one
group's.

On FX (a torch model, edited in place) modules stay distinct, so an HF model keeps a KV-cache
slot per layer and still generates; the parameters are shared, so the state dict, a saved file
and an export hold each shared weight once. On ONNX the blocks' weight
nodes read the same initializers (the others go: the file shrinks). The compression state
records, per block, the block whose weights it reads (``shares_with``); the report gives the
groups and the unique parameter count before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from torch import nn

from effc.errors import PassOptionError, UnsupportedError
from effc.ir.blocks import block_layers, find_blocks
from effc.ir.reducers import hessians
from effc.ir.sites import COMPRESSED, read_weight, weight_sites, write_weight
from effc.pass_base import Pass, PassResult
from effc.passes._train import keep_teacher
from effc.progress import bar
from effc.registry import register


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def groups_of(n: int, group: int) -> list[list[int]]:
    """Consecutive blocks 0..n-1 in groups of ``group`` (the last may be smaller)."""
    return [list(range(i, min(i + group, n))) for i in range(0, n, group)]


FIT_DAMP = 0.01  # of the mean diagonal of the summed Hessian: the pull towards the mean weight


def fit_shared(weights: list[torch.Tensor], hess: list[torch.Tensor]) -> torch.Tensor:
    """The weight W minimising sum_i ||X_i W^T - X_i W_i^T||^2 + d ||W - mean_i W_i||^2 given
    each H_i = X_i^T X_i: W = (sum_i W_i H_i + d mean_i W_i)(sum_i H_i + d I)^-1, in float64.
    The damping d (``FIT_DAMP`` of the mean diagonal) settles directions no input reaches at the
    mean, so equal weights fit to themselves."""
    total = sum(h.double() for h in hess)
    rhs = sum(w.double() @ h.double() for w, h in zip(weights, hess))
    damp = FIT_DAMP * total.diagonal().mean().clamp_min(1e-12)
    rhs = rhs + damp * torch.stack(weights).double().mean(0)
    total = total + damp * torch.eye(total.shape[0], dtype=total.dtype)
    return torch.linalg.solve(total, rhs.T).T.to(weights[0].dtype)  # total is symmetric


def output_error(weight: torch.Tensor, value: torch.Tensor, hess: torch.Tensor) -> float:
    """||X (value - weight)^T||^2 / ||X weight^T||^2 given H = X^T X."""
    e, w, h = (value - weight).double(), weight.double(), hess.double()
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


def shared_value(
    views: list[torch.Tensor],
    choose: str,
    hess: list[torch.Tensor] | None = None,
    errors: list[float] | None = None,
) -> torch.Tensor:
    """The one weight a group's ``views`` (one per block) share; ``fit`` needs each block's
    Hessian ``hess`` and appends each block's relative output error to ``errors``."""
    if choose == "first":
        return views[0]
    if choose == "mean":
        return torch.stack(views).mean(0)
    value = fit_shared(views, hess)
    if errors is not None:
        errors += [output_error(w, value, h) for w, h in zip(views, hess)]
    return value


@torch.no_grad()
def share_linears(
    layers: list[nn.Module],
    choose: str,
    hess: dict[str, list[torch.Tensor]] | None = None,
    errors: list[float] | None = None,
) -> list[float]:
    """Make every linear weight of ``layers`` one ``nn.Parameter`` per linear name: the first
    layer's (``choose=first``), the mean of all (``mean``) or their least-squares fit (``fit``,
    with ``hess[name]`` the layers' input Hessians; output errors go to ``errors``). Biases and
    norms stay per layer. Returns each replaced weight's relative change."""
    linears = [_linears(layer) for layer in layers]
    drift = []
    for name in linears[0]:
        mods = [lin[name] for lin in linears]
        params = [m.weight for m in mods]
        views = [p.detach() for p in params]
        value = shared_value(views, choose, (hess or {}).get(name), errors)
        shared = nn.Parameter(value.clone(), requires_grad=params[0].requires_grad)
        for m, p in zip(mods, params):
            drift.append(float((p - value).norm() / p.norm().clamp_min(1e-30)))
            m.weight = shared
    return drift


@register
class ShareBlocks(Pass):
    """Blocks in groups of ``group`` share their linear weights; norms stay per block."""

    name = "share-blocks"
    lossy = True

    @dataclass
    class Options:
        group: int = 2
        choose: Literal["first", "mean", "fit"] = "first"
        sequential: bool = False  # fit: each group on the inputs of the earlier groups shared

    def needs_calibration(self) -> bool:
        return self.options.choose == "fit"

    def validate(self) -> None:
        if self.options.group < 2:
            raise PassOptionError(
                f"pass 'share-blocks': group must be >= 2 blocks, got {self.options.group}"
            )
        if self.options.sequential and self.options.choose != "fit":
            raise PassOptionError(
                "pass 'share-blocks': sequential=true fits each group on the inputs the shared "
                "groups before it give; it needs choose=fit"
            )

    def requires(self, model, ctx) -> None:
        super().requires(model, ctx)
        if model.kind == "fx":
            self._layers(model)
        elif len(find_blocks(model)) < 2:
            raise UnsupportedError("pass 'share-blocks': the model has no repeated blocks")
        compressed = [f for f, s in model.compression.sites.items() if s.compressed]
        if compressed:
            raise UnsupportedError(
                f"pass 'share-blocks': {compressed[0]} is already compressed; share blocks "
                "before pruning or quantizing them"
            )

    def _layers(self, model) -> tuple[str, nn.ModuleList]:
        container, layers, _ = block_layers(model, self.name, every_block=False)
        shapes = {tuple((n, m.weight.shape) for n, m in _linears(b).items()) for b in layers}
        if len(shapes) != 1:
            raise UnsupportedError(
                f"pass 'share-blocks': the blocks of {container} differ in their linear layers"
            )
        return container, layers

    def _groups(self, n: int) -> list[list[int]]:
        return [m for m in groups_of(n, self.options.group) if len(m) > 1]

    def _per_group(self, model, ctx, fqns: list[list[str]]):
        """``fit``: yields, group by group, the input Hessians of the weight sites ``fqns[g]``
        names: all measured in one run of the model before sharing, or (``sequential``) each
        group's in a run of the model as the groups before it left it (so a group's fit also
        sees what sharing the earlier ones changed), with a progress bar. Others: empty."""
        if self.options.choose != "fit":
            yield from ({} for _ in fqns)
        elif not self.options.sequential:
            H = self._hessians(model, ctx, [f for group in fqns for f in group])
            yield from (H for _ in fqns)
        else:
            progress, task = bar(len(fqns), "share-blocks: sequential fit")
            with progress:
                for group in fqns:
                    yield self._hessians(model, ctx, group)
                    progress.advance(task)

    def _hessians(self, model, ctx, fqns: list[str]) -> dict[str, torch.Tensor]:
        sites = {s.fqn: s for s in weight_sites(model)}
        missing = [f for f in fqns if f not in sites]
        if missing:
            raise UnsupportedError(
                f"pass 'share-blocks': choose=fit found no weight of its own at {missing[0]} "
                "(already shared?)"
            )
        conv = [f for f in fqns if sites[f].op != "linear"]
        if conv:
            raise UnsupportedError(
                f"pass 'share-blocks': choose=fit fits linear weights, and {conv[0]} is a "
                f"{sites[conv[0]].op}; use choose=first or mean"
            )
        return hessians(model, [sites[f] for f in fqns], ctx.calibration)

    def _run_onnx(self, model, ctx) -> PassResult:
        """Blocks of a group read the first block's weight initializers (or one holding the
        group's mean or fit); the others' initializers go, so the file holds each shared weight
        once. Biases and norms stay per block."""
        blocks = find_blocks(model)
        container = blocks[0].fqn.rpartition(".")[0]
        graph = model.model.graph
        before = model.param_stats()[0]
        groups = self._groups(len(blocks))
        shared = []  # per group: (site of each member) per weight shared
        for members in groups:
            sites = [{s.fqn[len(blocks[i].fqn) + 1 :]: s for s in blocks[i].sites} for i in members]
            shared.append([])
            for suffix, first in sites[0].items():
                group_sites = [m.get(suffix) for m in sites]
                if all(s is not None and s.handle[1] == first.handle[1] for s in group_sites):
                    shared[-1].append(group_sites)
        fqns = [[s.fqn for group_sites in group for s in group_sites] for group in shared]
        drift, errors = [], []
        for group, H in zip(shared, self._per_group(model, ctx, fqns)):
            for group_sites in group:
                first = group_sites[0]
                views = [read_weight(s) for s in group_sites]
                hess = [H.pop(s.fqn) for s in group_sites] if H else None
                value = shared_value(views, self.options.choose, hess, errors)
                if self.options.choose != "first":
                    write_weight(first, value)
                    first.handle[0].metadata_props.pop(COMPRESSED, None)  # shared, not compressed
                canonical = first.handle[0]
                for s, w in zip(group_sites, views):
                    drift.append(float((w - value).norm() / w.norm().clamp_min(1e-30)))
                    if s.handle[0] is not canonical:
                        s.handle[0].replace_all_uses_with(canonical)
        for members in groups:
            for i in members[1:]:
                model.compression.block(f"{container}.{i}").shares_with = blocks[members[0]].fqn
        RemoveUnusedNodesPass()(model.model)
        for name, v in list(graph.initializers.items()):
            if not v.uses() and not v.is_graph_output():
                graph.initializers.pop(name)
        after = model.param_stats()[0]
        stats = self._stats(container, groups, before, after, drift, errors)
        return PassResult(model, bool(groups), stats)

    def _stats(self, container, groups, before, after, drift, errors) -> dict:
        stats = {
            "groups": [[f"{container}.{i}" for i in g] for g in groups],
            "choose": self.options.choose,
            "parameters_before": before,
            "parameters_after": after,
            "weight_rel_change_mean": round(sum(drift) / max(len(drift), 1), 6),
        }
        if errors:
            stats["output_rel_error_mean"] = round(sum(errors) / len(errors), 6)
            stats["output_rel_error_max"] = round(max(errors), 6)
        return stats

    @torch.no_grad()
    def run(self, model, ctx) -> PassResult:
        if model.kind == "onnx":
            return self._run_onnx(model, ctx)
        o = self.options
        container, layers = self._layers(model)
        keep_teacher(model, ctx)  # for a cure later in the pipeline
        before = model.param_stats()[0]  # each shared tensor counted once
        groups = self._groups(len(layers))
        names = {i: list(_linears(layers[i])) for g in groups for i in g}
        fqns = [[f"{container}.{i}.{n}" for i in g for n in names[i]] for g in groups]
        drift, errors = [], []
        for members, H in zip(groups, self._per_group(model, ctx, fqns)):
            hess = None
            if H:
                hess = {
                    n: [H.pop(f"{container}.{i}.{n}") for i in members] for n in names[members[0]]
                }
            drift += share_linears([layers[i] for i in members], o.choose, hess, errors)
            for i in members[1:]:
                model.compression.block(
                    f"{container}.{i}"
                ).shares_with = f"{container}.{members[0]}"
        model.retrace()
        after = model.param_stats()[0]
        stats = self._stats(container, groups, before, after, drift, errors)
        return PassResult(model, bool(groups), stats)
