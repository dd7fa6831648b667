"""Shared parts of the FX fusion rules."""

from __future__ import annotations


def frozen_params(model) -> set[str]:
    """get_attr targets of compressed weights (on a quantization grid or a sparsity pattern): the
    rules never fold anything into them (the ONNX rules read the same fact off the initializer's
    ``effc.compressed`` metadata, which ``write_weight`` sets)."""
    return {f"{fqn}.weight" for fqn, state in model.compression.sites.items() if state.compressed}


def commit(model, gm, fired: int) -> int:
    """After ``fired`` rewrites of ``gm``: drop dead nodes, recompile, and hand the graph back to
    ``model`` (marking it structurally modified). Returns ``fired``."""
    if fired:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        model.graph_module = gm
    return fired
