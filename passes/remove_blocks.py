"""remove-blocks: depth pruning of transformer blocks (FoldGPT's removal step; ShortGPT's score).

Blocks are the repeated layers ``find_blocks`` discovers (``model.layers.N``). Scores:

- ``cosine``: run the model on calibration inputs and take, per block, the mean cosine
  similarity between the hidden state entering it and the one leaving it (per token). A block
  whose output is nearly its input does little (ShortGPT's block influence is 1 - this); the
  most similar blocks go.
- ``gates``: the gates a ``block-gates`` run left in the compression state; the lowest go.
- ``greedy`` (FX): blocks go one at a time, each time the block whose skipping moves the model's
  output least from the original's on ``samples`` calibration inputs (the KL divergence of the
  next-token distributions; an encoder's relative output MSE), measured with the blocks already
  chosen skipped: the coupling between blocks that one-at-a-time scores miss, bought with
  about ``count x blocks`` forward passes (SLEB's iterative removal, with a distillation metric).
  A block's score is its distance when skipped alone (the first round).
- ``random``: seeded; the baseline the scores must beat.

On FX (a torch model, edited in place) the block container (an ``nn.ModuleList``) loses the
removed blocks and the rest are renumbered as a smaller model of the same class would be, so an
HF model keeps working with ``generate()``: each attention's ``layer_idx`` (its KV-cache slot),
``config.num_hidden_layers`` and ``config.layer_types``. On ONNX the residual stream between
blocks is found (``residual_stream``: the hidden state each block's last Add hands to the next),
a removed block's exit is replaced by its entry, and every node only it needed goes (what later
blocks share, such as an attention mask computed in block 0, stays); cosine scores come from one
onnxruntime session that also returns the stream. Compression records follow their blocks'
new numbers; the report lists the removed blocks by their original index with every score.
Streaming (``--stream``, ``effc.stream``) runs it as the first pass of a pipeline, with
``score=cosine`` or ``random``: a sweep over the original blocks scores them the same way, and the
kept ones are compressed and written renumbered.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass
from torch import nn

from effc.errors import PassOptionError, UnsupportedError
from effc.ir.blocks import block_layers, find_blocks
from effc.ir.ort import session_for
from effc.pass_base import Pass, PassResult
from effc.passes._train import hidden_state, keep_teacher, output_distance
from effc.progress import bar
from effc.registry import register


def token_cosines(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of cos(x, y), number of tokens) of two hidden states of one shape."""
    cos = torch.nn.functional.cosine_similarity(
        x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double(), dim=-1
    )
    return float(cos.sum()), cos.numel()


def chosen(score: str, scores: list[float], n: int) -> set[int]:
    """The ``n`` blocks to remove: the most similar (cosine), the lowest (gates, random)."""
    sign = -1.0 if score == "cosine" else 1.0
    return set(sorted(range(len(scores)), key=lambda i: sign * scores[i])[:n])


def random_scores(blocks: int, seed: int) -> list[float]:
    return [float(v) for v in np.random.default_rng(seed).random(blocks)]


@torch.no_grad()
def cosine_scores(model, layers: nn.ModuleList, data: list[dict]) -> list[float]:
    """Per block, the mean over tokens and samples of cos(input hidden, output hidden)."""
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)

    def hook(i):
        def fn(module, args, kwargs, output):
            x = hidden_state(args[0] if args else kwargs.get("hidden_states"))
            y = hidden_state(output)
            if x is None or y is None or x.shape != y.shape:
                return
            total, count = token_cosines(x, y)
            sums[i] += total
            counts[i] += count

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(layers)]
    progress, task = bar(len(data), "remove-blocks: cosine scores")
    try:
        with model.plain_outputs(), progress:
            for sample in data:
                model.module(**{k: torch.as_tensor(np.asarray(v)) for k, v in sample.items()})
                progress.advance(task)
    finally:
        for h in handles:
            h.remove()
    if not all(counts):
        raise UnsupportedError(
            "pass 'remove-blocks': cannot read the hidden states entering and leaving every "
            "block (score=cosine needs blocks that map a hidden state to one of the same shape)"
        )
    return [s / c for s, c in zip(sums, counts)]


class Skipping:
    """Forward hooks on a torch model's blocks that skip the blocks in ``skipped`` (each one's
    output replaced by its input: what removing it computes) while the context is open."""

    def __init__(self, layers: nn.ModuleList):
        self.layers, self.skipped, self.handles = layers, set(), []

    def _hook(self, i: int):
        def fn(module, args, kwargs, output):
            if i not in self.skipped:
                return None
            x = args[0] if args else kwargs.get("hidden_states")
            return x if isinstance(output, torch.Tensor) else (x, *output[1:])

        return fn

    def __enter__(self) -> Skipping:
        self.handles = [
            b.register_forward_hook(self._hook(i), with_kwargs=True)
            for i, b in enumerate(self.layers)
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.skipped.clear()


@torch.no_grad()
def greedy_removal(model, layers: nn.ModuleList, data: list[dict], count: int) -> list[dict]:
    """``count`` rounds; each skips, in turn, every block not yet chosen (its output replaced by
    its input) on top of the chosen ones, measures the output's distance from the original
    model's on ``data`` and chooses the closest. Returns per round {"removed", "distance",
    "distances" (per block, inf for those already chosen)}."""
    inputs = [{k: torch.as_tensor(np.asarray(v)) for k, v in x.items()} for x in data]
    n, rounds = len(layers), []
    progress, task = bar(sum(n - r for r in range(count)), "remove-blocks: greedy")
    with Skipping(layers) as skip, model.plain_outputs(), progress:
        skipped = skip.skipped
        reference = [model.module(**x) for x in inputs]
        for _ in range(count):
            distances = [math.inf] * n
            for i in (i for i in range(n) if i not in skipped):
                skipped.add(i)
                d = [output_distance(model.module(**x), r) for x, r in zip(inputs, reference)]
                skipped.discard(i)
                distances[i] = float(sum(d) / len(d))
                progress.advance(task)
            best = min(range(n), key=lambda i: distances[i])
            skipped.add(best)
            rounds.append({"removed": best, "distance": distances[best], "distances": distances})
    return rounds


def _block_of(node: ir.Node, container: str) -> int | None:
    """The block index a node belongs to, from the exporter's name scopes or its name."""
    text = node.metadata_props.get("pkg.torch.onnx.name_scopes") or ""
    text += " " + (node.name or "").replace("/", ".")
    m = re.search(rf"(?:^|[\s'./]){re.escape(container)}\.(\d+)(?:[.'\s]|$)", text)
    return int(m.group(1)) if m else None


def residual_stream(model, blocks) -> list[ir.Value]:
    """The hidden states between ONNX blocks: [entry of block 0, exit of block 0 (= entry of
    block 1), ..., exit of the last]. Each exit is the value an Add of block i produces that
    the next block (or the nodes after the blocks) reads, with the hidden size as its last dim;
    block 0's entry is the value of that size from outside every block that block 0 reads.
    Shapes are inferred first where the graph lacks them (a legacy torch export writes none)."""
    if any(v.shape is None for node in model.model.graph for v in node.outputs):
        ShapeInferencePass(strict_mode=False)(model.model)
    container = blocks[0].fqn.rpartition(".")[0]
    hidden = blocks[0].sites[0].in_features
    owner = {id(n): _block_of(n, container) for n in model.model.graph}
    n = len(blocks)

    def produced_by(v):
        p = v.producer()
        return None if p is None else owner.get(id(p), None)

    def fits(v):
        return v.shape is not None and len(v.shape) >= 2 and v.shape[-1] == hidden

    def readers(v):
        return {owner.get(id(u.node)) for u in v.uses()}

    stream: list[ir.Value] = []
    first = {
        v
        for node in model.model.graph
        if owner[id(node)] == 0
        for v in node.inputs
        if v is not None and v.const_value is None and produced_by(v) is None and fits(v)
    }
    if len(first) != 1:
        raise UnsupportedError(
            f"pass 'remove-blocks': cannot tell the hidden state entering {container}.0 "
            f"({len(first)} candidates)"
        )
    stream.append(first.pop())
    for i in range(n):
        later = i + 1 if i + 1 < n else None
        exits = {
            v
            for node in model.model.graph
            if owner[id(node)] == i and node.op_type == "Add"
            for v in node.outputs
            if fits(v) and later in readers(v) | ({None} if v.is_graph_output() else set())
        }
        if len(exits) != 1:
            raise UnsupportedError(
                f"pass 'remove-blocks': cannot tell the hidden state leaving {container}.{i} "
                f"({len(exits)} candidates)"
            )
        stream.append(exits.pop())
    return stream


def onnx_cosine_scores(model, stream: list[ir.Value], data: list[dict]) -> list[float]:
    """Per block, mean cos(entry, exit) over tokens, from one onnxruntime session that also
    returns the residual stream."""
    graph = model.model.graph
    added = [v for v in stream if v not in graph.outputs]
    graph.outputs.extend(added)
    try:
        session = session_for(model.model, optimize="basic")
        names = [v.name for v in stream]
        sums = np.zeros(len(stream) - 1)
        count = 0
        progress, task = bar(len(data), "remove-blocks: cosine scores")
        with progress:
            for sample in data:
                states = session.run(names, sample)
                flat = [s.reshape(-1, s.shape[-1]).astype(np.float64) for s in states]
                norms = [np.linalg.norm(f, axis=1) for f in flat]
                for i in range(len(stream) - 1):
                    dot = (flat[i] * flat[i + 1]).sum(1)
                    sums[i] += (dot / np.maximum(norms[i] * norms[i + 1], 1e-30)).sum()
                count += flat[0].shape[0]
                progress.advance(task)
    finally:
        for v in added:
            graph.outputs.remove(v)
    return [float(x / count) for x in sums]


def remove_onnx(model, blocks, stream: list[ir.Value], drop: set[int]) -> None:
    """Each dropped block's exit is replaced by its entry; what only it used goes."""
    for i in sorted(drop, reverse=True):  # later first, so entries stay valid values
        exit_, entry = stream[i + 1], stream[i]
        if exit_.is_graph_output():
            name = exit_.name
            exit_.replace_all_uses_with(entry, replace_graph_outputs=True)
            exit_.name, entry.name = f"{name}__removed", name
        else:
            exit_.replace_all_uses_with(entry)
    RemoveUnusedNodesPass()(model.model)
    container = blocks[0].fqn.rpartition(".")[0]
    keep = [b.index for b in blocks if b.index not in drop]
    old_to_new = {old: new for new, old in enumerate(keep)}
    _renumber_records(model.compression, container, old_to_new)


def _renumber(fqn: str, container: str, old_to_new: dict[int, int]) -> str | None:
    """``fqn`` with its block index mapped (None for a removed block); others unchanged."""
    m = re.match(rf"^{re.escape(container)}\.(\d+)(\..*)?$", fqn)
    if m is None:
        return fqn
    new = old_to_new.get(int(m.group(1)))
    return None if new is None else f"{container}.{new}{m.group(2) or ''}"


def remove(model, container: str, drop: set[int]) -> None:
    """Drop blocks ``drop`` of ``container`` from the torch model; renumber the rest (attention
    ``layer_idx``, HF config) and the compression records."""
    module = model.module
    layers = module.get_submodule(container)
    keep = [i for i in range(len(layers)) if i not in drop]
    parent_name, _, attr = container.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    for new, block in enumerate(getattr(parent, attr)):
        for sub in block.modules():
            if hasattr(sub, "layer_idx") and isinstance(sub.layer_idx, int):
                sub.layer_idx = new
    config = getattr(module, "config", None)
    if config is not None:
        renumber_config(config, len(layers), keep)
    old_to_new = {old: new for new, old in enumerate(keep)}
    _renumber_records(model.compression, container, old_to_new)
    model.retrace()


def renumber_config(config, blocks: int, keep: list[int]) -> None:
    """An HF config of ``blocks`` layers describes the ``keep`` ones (``num_hidden_layers``,
    ``layer_types``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "num_hidden_layers", None) == blocks:
        text.num_hidden_layers = len(keep)
    types = getattr(text, "layer_types", None)
    if isinstance(types, list) and len(types) == blocks:
        text.layer_types = [types[i] for i in keep]


def _renumber_records(state, container: str, old_to_new: dict[int, int]) -> None:
    state.sites = {
        n: s
        for f, s in state.sites.items()
        if (n := _renumber(f, container, old_to_new)) is not None
    }
    state.blocks = {
        n: b
        for f, b in state.blocks.items()
        if (n := _renumber(f, container, old_to_new)) is not None
    }


@register
class RemoveBlocks(Pass):
    """Remove the least useful transformer blocks (cosine of in/out states, gates, or random)."""

    name = "remove-blocks"
    lossy = True

    @dataclass
    class Options:
        count: int = 0  # blocks to remove; or
        rate: float = 0.0  # the fraction of blocks to remove (rounded to the nearest block)
        score: Literal["cosine", "gates", "greedy", "random"] = "cosine"
        samples: int = 8  # calibration samples for score=cosine and greedy

    def needs_calibration(self) -> bool:
        return self.options.score in ("cosine", "greedy")

    def validate(self) -> None:
        o = self.options
        if (o.count > 0) == (o.rate > 0):
            raise PassOptionError(
                "pass 'remove-blocks': give exactly one of count (blocks) or rate (a fraction), "
                f"got count={o.count}, rate={o.rate}"
            )
        if o.count < 0 or not 0 <= o.rate < 1:
            raise PassOptionError(
                f"pass 'remove-blocks': need count >= 1 or 0 < rate < 1, got count={o.count}, "
                f"rate={o.rate}"
            )
        if o.samples < 1:
            raise PassOptionError(f"pass 'remove-blocks': samples must be >= 1, got {o.samples}")

    def _blocks(self, model) -> tuple[str, nn.ModuleList | list, list]:
        if model.kind == "onnx":
            blocks = find_blocks(model)
            if not blocks:
                raise UnsupportedError("pass 'remove-blocks': the model has no repeated blocks")
            return blocks[0].fqn.rpartition(".")[0], blocks, blocks
        return block_layers(model, self.name)

    def requires(self, model, ctx) -> None:
        super().requires(model, ctx)
        container, layers, _ = self._blocks(model)
        self.count(len(layers))
        if self.options.score == "greedy" and model.kind == "onnx":
            raise UnsupportedError(
                "pass 'remove-blocks': score=greedy runs the torch model with blocks skipped and "
                "is FX only; on ONNX use score=cosine (or compress the torch model)"
            )
        if self.options.score == "gates":
            missing = [
                f"{container}.{i}"
                for i in range(len(layers))
                if getattr(model.compression.blocks.get(f"{container}.{i}"), "gate", None) is None
            ]
            if missing:
                raise UnsupportedError(
                    f"pass 'remove-blocks': score=gates reads block gates, and {missing[0]} has "
                    "none: run block-gates first"
                )

    def count(self, blocks: int) -> int:
        """How many of ``blocks`` blocks go; a one-line error unless at least one stays."""
        o = self.options
        n = o.count if o.count else int(math.floor(o.rate * blocks + 0.5))
        if not 1 <= n < blocks:
            raise PassOptionError(
                f"pass 'remove-blocks': would remove {n} of {blocks} blocks; keep at least one"
            )
        return n

    def run(self, model, ctx) -> PassResult:
        o = self.options
        container, layers, blocks = self._blocks(model)
        n = self.count(len(layers))
        stream = residual_stream(model, blocks) if model.kind == "onnx" else None
        if o.score == "cosine" and stream is not None:
            scores = onnx_cosine_scores(model, stream, ctx.calibration[: o.samples])
        elif o.score == "cosine":
            scores = cosine_scores(model, layers, ctx.calibration[: o.samples])
        elif o.score == "gates":
            scores = [model.compression.blocks[f"{container}.{i}"].gate for i in range(len(layers))]
        elif o.score == "greedy":
            steps = greedy_removal(model, layers, ctx.calibration[: o.samples], n)
            scores = steps[0]["distances"]
        else:
            scores = random_scores(len(layers), ctx.seed)
        drop = {s["removed"] for s in steps} if o.score == "greedy" else chosen(o.score, scores, n)
        if stream is not None:
            remove_onnx(model, blocks, stream, drop)
        else:
            keep_teacher(model, ctx)  # for a cure later in the pipeline
            remove(model, container, drop)
        stats = {
            "score": o.score,
            "blocks_before": len(layers),
            "blocks_after": len(layers) - n,
            "removed": sorted(drop),
            "scores": [round(s, 6) for s in scores],
        }
        if o.score == "greedy":
            stats["greedy"] = [
                {"removed": s["removed"], "distance": round(s["distance"], 6)} for s in steps
            ]
        return PassResult(model, True, stats)
