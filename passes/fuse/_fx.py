"""Shared tail of the FX fusion rules."""

from __future__ import annotations


def commit(model, gm, fired: int) -> int:
    """After ``fired`` rewrites of ``gm``: drop dead nodes, recompile, and hand the graph back to
    ``model`` (marking it structurally modified). Returns ``fired``."""
    if fired:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        model.graph_module = gm
    return fired
