"""Calibration activations at weight sites, on both IRs.

``collect_site_inputs(model, sites, inputs, fn)`` runs the model on each calibration input and
calls ``fn(site, x)`` with the site's input activations as a float tensor (rows, in). FX registers
forward hooks on the sites' modules; ONNX exposes the sites' input values as extra graph outputs
for one onnxruntime session. Passes reduce ``x`` on the fly (column norms, Hessians), so no
activation is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from effc.errors import InputError
from effc.ir.sites import WeightSite


def collect_site_inputs(
    model,
    sites: list[WeightSite],
    inputs: list[dict[str, np.ndarray]],
    fn: Callable[[WeightSite, torch.Tensor], None],
) -> None:
    if not inputs:
        raise InputError("this pass needs calibration inputs (--calib) and none were given")
    if model.kind == "fx":
        _collect_fx(model, sites, inputs, fn)
    else:
        _collect_onnx(model, sites, inputs, fn)


def _collect_fx(model, sites, inputs, fn) -> None:
    def run():
        for x in inputs:
            model.module(**{k: torch.from_numpy(np.asarray(v)) for k, v in x.items()})

    _collect_fx_on(model.module, sites, run, fn)


def _collect_onnx(model, sites, inputs, fn) -> None:
    acts = {site.fqn: site.node.inputs[0] for site in sites}
    values = list(dict.fromkeys(acts.values()))

    def each(outs: dict[str, np.ndarray]) -> None:
        for site in sites:
            act = outs[acts[site.fqn].name]
            fn(site, torch.from_numpy(np.asarray(act, dtype=np.float32)).reshape(-1, act.shape[-1]))

    collect_values(model, values, inputs, each)


def collect_values(model, values: list, inputs: list[dict[str, np.ndarray]], fn) -> None:
    """Run an ONNX model on each calibration input with ``values`` (onnx_ir values) exposed as
    extra graph outputs; ``fn({name: array})`` sees them, one input at a time."""
    from effc.backends.onnxruntime import session_for

    if not inputs:
        raise InputError("this pass needs calibration inputs (--calib) and none were given")
    graph = model.model.graph
    extra = [v for v in dict.fromkeys(values) if v not in graph.outputs]
    graph.outputs.extend(extra)
    try:
        session = session_for(model.model)
        names = [o.name for o in session.get_outputs()]
        for x in inputs:
            fn(dict(zip(names, session.run(None, x))))
    finally:
        for v in extra:
            graph.outputs.remove(v)


class _Stop(Exception):
    pass


def capture_block_inputs(module, block, inputs: list[dict]) -> list[tuple]:
    """(args, kwargs) that ``block`` (a submodule of ``module``) receives for each calibration
    input; the model stops there, so only the layers before the block run."""
    captured = []

    def hook(_mod, args, kwargs):
        captured.append(
            (tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs))
        )
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for x in inputs:
                try:
                    module(**{k: torch.from_numpy(np.asarray(v)) for k, v in x.items()})
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def block_output(out) -> torch.Tensor:
    """A block's hidden state from what it returns (a tensor, or a tuple led by one)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _stages(model, sites: list[WeightSite]) -> list[tuple[str | None, list[WeightSite]]]:
    """(block FQN, its sites) for every repeated block in order, then (None, the sites outside
    every block: lm_head). Raises when the model has no blocks."""
    from effc.errors import UnsupportedError
    from effc.ir.blocks import find_blocks

    blocks = find_blocks(model)
    if not blocks:
        raise UnsupportedError(
            "sequential calibration needs repeated blocks (transformer layers) and none were found"
        )
    stages = [(b.fqn, [s for s in sites if s.fqn.startswith(b.fqn + ".")]) for b in blocks]
    inside = {s.fqn for _, stage in stages for s in stage}
    return stages + [(None, [s for s in sites if s.fqn not in inside])]


def calibrate_sequentially(
    model,
    sites: list[WeightSite],
    inputs: list[dict[str, np.ndarray]],
    fn: Callable[[WeightSite, torch.Tensor], None],
    compress: Callable[[list[WeightSite]], None],
    advance: Callable[[list[WeightSite]], None] = lambda stage: None,
) -> int:
    """Calibrate and compress ``sites`` stage by stage, as SparseGPT and GPTQ do: each repeated
    block's sites, in order, then the sites after the blocks (lm_head). ``fn(site, x)`` sees a
    stage's input activations as the model computes them with every earlier stage already
    compressed, then ``compress(stage)`` writes the stage's new weights; so each layer's error
    compensation also absorbs what the layers before it lost. ``advance(stage)`` after every stage;
    returns the number of stages.

    FX: the first block's inputs are captured once and each block runs on its predecessor's
    outputs (one block forward to calibrate, one to move on); the sites after the blocks see one
    run of the whole model. ONNX (and FX graphs a structural pass rewrote): one run of the whole
    model per stage, the same activations at a higher cost."""
    if not inputs:
        raise InputError("this pass needs calibration inputs (--calib) and none were given")
    stages = _stages(model, sites)
    fast = model.kind == "fx" and not model.graph_modified
    if fast:
        module = model.module
        cached = capture_block_inputs(module, module.get_submodule(stages[0][0]), inputs)
    count = 0
    for fqn, stage in stages:
        block = module.get_submodule(fqn) if fast and fqn is not None else None
        if stage:
            if block is not None:
                run = lambda block=block, cached=cached: [block(*a, **k) for a, k in cached]  # noqa: E731
                _collect_fx_on(module, stage, run, fn)
            else:
                collect_site_inputs(model, stage, inputs, fn)
            compress(stage)
            count += 1
            advance(stage)
        if block is not None:  # the next block's inputs, from this one compressed
            with torch.no_grad():
                cached = [((block_output(block(*a, **k)), *a[1:]), k) for a, k in cached]
    return count


def _collect_fx_on(module, sites, run, fn) -> None:
    """``fn(site, x)`` for every call of the sites' modules during ``run()``."""
    handles = []
    for site in sites:

        def hook(_mod, args, _out, site=site):
            fn(site, args[0].detach().reshape(-1, args[0].shape[-1]).float())

        handles.append(module.get_submodule(site.fqn).register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
