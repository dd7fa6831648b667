"""Block discovery: the repeated layers of a transformer (``model.layers.N``, ``encoder.layer.N``).

Works on weight-site names, so it gives the same answer on FX and ONNX. A block container is a
path followed by an integer component; it qualifies when at least two indices have the same
sites (the same name suffixes, ops and shapes). The container with the most blocks wins.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from effc.errors import UnsupportedError
from effc.ir.sites import WeightSite, weight_sites

_INDEXED = re.compile(r"^(?P<prefix>(?:.*\.)?[A-Za-z_][\w]*)\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass
class Block:
    fqn: str  # e.g. model.layers.3
    index: int
    sites: list[WeightSite] = field(default_factory=list)


def find_blocks(model_or_sites) -> list[Block]:
    sites = model_or_sites if isinstance(model_or_sites, list) else weight_sites(model_or_sites)
    by_container: dict[str, dict[int, list[WeightSite]]] = defaultdict(lambda: defaultdict(list))
    for site in sites:
        for m in _iter_matches(site.fqn):
            by_container[m[0]][m[1]].append(site)
    best: tuple[int, int, str] | None = None
    for container, blocks in by_container.items():
        shapes = {
            frozenset((s.fqn[len(f"{container}.{i}.") :], s.op, s.shape) for s in members)
            for i, members in blocks.items()
        }
        if len(blocks) < 2 or len(shapes) != 1:
            continue
        key = (len(blocks), sum(map(len, blocks.values())), container)
        best = max(best, key) if best else key
    if best is None:
        return []
    container = best[2]
    return [
        Block(f"{container}.{i}", i, members)
        for i, members in sorted(by_container[container].items())
    ]


def _iter_matches(fqn: str):
    """Every (container, index) split of ``fqn`` at an integer path component."""
    parts = fqn.split(".")
    for k in range(1, len(parts) - 1):
        if parts[k].isdigit():
            yield ".".join(parts[:k]), int(parts[k])


def block_layers(
    model, what: str, every_block: bool = True
) -> tuple[str, nn.ModuleList, list[Block]]:
    """The blocks of an FX model as its torch container: (container fqn, the ``nn.ModuleList``
    holding one module per block, the blocks found by weight sites). The depth passes edit and
    hook that list; ``what`` names the pass in the one-line error for a model without one.
    ``every_block``: the list must hold exactly the blocks found (false after share-blocks,
    where blocks reading another's weights have no weight sites of their own)."""
    blocks = find_blocks(model)
    if not blocks:
        raise UnsupportedError(f"pass '{what}': the model has no repeated blocks")
    container = blocks[0].fqn.rpartition(".")[0]
    try:
        layers = model.module.get_submodule(container)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList) or (
        len(layers) != len(blocks) if every_block else len(layers) < 2
    ):
        raise UnsupportedError(
            f"pass '{what}': the blocks {container}.N are not one nn.ModuleList of "
            f"{len(blocks)} layers"
        )
    return container, layers, blocks
