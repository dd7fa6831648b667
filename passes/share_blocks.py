"""share-blocks: FoldGPT's group parameter sharing. Consecutive transformer blocks are grouped
(``group`` blocks each, the last group may be smaller); inside a group every block's linear
weights become one shared ``nn.Parameter``, while each block keeps its own norms, its own biases
(a BERT's; a few hundred numbers a layer, as cheap to keep as the norms, and what the ONNX form
keeps, since there a bias is an Add after the weight's MatMul) and anything else that is not a
linear weight, all of which a cure fine-tune re-adapts.

``choose``: ``first`` shares the first block's weights; ``mean`` shares the element-wise mean
of the group's weights. On FX (a torch model, edited in place) modules stay distinct, so an HF
model keeps a KV-cache slot per layer and still generates; the parameters are shared, so the
state dict, a saved file and an export hold each shared weight once. On ONNX the blocks' weight
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
from effc.ir.sites import COMPRESSED, read_weight, write_weight
from effc.pass_base import Pass, PassResult
from effc.passes._train import keep_teacher
from effc.registry import register


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def groups_of(n: int, group: int) -> list[list[int]]:
    """Consecutive blocks 0..n-1 in groups of ``group`` (the last may be smaller)."""
    return [list(range(i, min(i + group, n))) for i in range(0, n, group)]


@torch.no_grad()
def share_linears(layers: list[nn.Module], choose: str) -> list[float]:
    """Make every linear weight of ``layers`` one ``nn.Parameter`` per linear name: the first
    layer's (``choose=first``) or the mean of all (``mean``). Biases and norms stay per layer.
    Returns each replaced weight's relative change."""
    linears = [_linears(layer) for layer in layers]
    drift = []
    for name in linears[0]:
        mods = [lin[name] for lin in linears]
        params = [m.weight for m in mods]
        stack = torch.stack([p.detach() for p in params])
        value = stack[0] if choose == "first" else stack.mean(0)
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
        choose: Literal["first", "mean"] = "first"

    def validate(self) -> None:
        if self.options.group < 2:
            raise PassOptionError(
                f"pass 'share-blocks': group must be >= 2 blocks, got {self.options.group}"
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

    def _run_onnx(self, model) -> PassResult:
        """Blocks of a group read the first block's weight initializers (or one holding the
        group's mean); the others' initializers go, so the file holds each shared weight once.
        Biases and norms stay per block."""
        blocks = find_blocks(model)
        container = blocks[0].fqn.rpartition(".")[0]
        graph = model.model.graph
        before = model.param_stats()[0]
        groups = self._groups(len(blocks))
        drift = []
        for members in groups:
            sites = [{s.fqn[len(blocks[i].fqn) + 1 :]: s for s in blocks[i].sites} for i in members]
            for suffix, first in sites[0].items():
                group_sites = [m.get(suffix) for m in sites]
                if any(s is None or s.handle[1] != first.handle[1] for s in group_sites):
                    continue
                views = [read_weight(s) for s in group_sites]
                value = views[0] if self.options.choose == "first" else torch.stack(views).mean(0)
                if self.options.choose == "mean":
                    write_weight(first, value)
                    first.handle[0].metadata_props.pop(COMPRESSED, None)  # shared, not compressed
                canonical = first.handle[0]
                for s, w in zip(group_sites, views):
                    drift.append(float((w - value).norm() / w.norm().clamp_min(1e-30)))
                    if s.handle[0] is not canonical:
                        s.handle[0].replace_all_uses_with(canonical)
            for i in members[1:]:
                model.compression.block(f"{container}.{i}").shares_with = blocks[members[0]].fqn
        RemoveUnusedNodesPass()(model.model)
        for name, v in list(graph.initializers.items()):
            if not v.uses() and not v.is_graph_output():
                graph.initializers.pop(name)
        after = model.param_stats()[0]
        return PassResult(model, bool(groups), self._stats(container, groups, before, after, drift))

    def _stats(self, container, groups, before, after, drift) -> dict:
        return {
            "groups": [[f"{container}.{i}" for i in g] for g in groups],
            "choose": self.options.choose,
            "parameters_before": before,
            "parameters_after": after,
            "weight_rel_change_mean": round(sum(drift) / max(len(drift), 1), 6),
        }

    @torch.no_grad()
    def run(self, model, ctx) -> PassResult:
        if model.kind == "onnx":
            return self._run_onnx(model)
        o = self.options
        container, layers = self._layers(model)
        keep_teacher(model, ctx)  # for a cure later in the pipeline
        before = model.param_stats()[0]  # each shared tensor counted once
        groups = self._groups(len(layers))
        drift = []
        for members in groups:
            drift += share_linears([layers[i] for i in members], o.choose)
            for i in members[1:]:
                model.compression.block(
                    f"{container}.{i}"
                ).shares_with = f"{container}.{members[0]}"
        model.retrace()
        after = model.param_stats()[0]
        return PassResult(model, bool(groups), self._stats(container, groups, before, after, drift))
