"""Block discovery: the repeated layers of a transformer (``model.layers.N``, ``encoder.layer.N``).

Works on weight-site names, so it gives the same answer on FX and ONNX. A block container is a
path followed by an integer component; it qualifies when at least two indices have the same
sites (the same name suffixes, ops and shapes). The container with the most blocks wins.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

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
