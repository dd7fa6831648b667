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


@torch.no_grad()
def _collect_fx(model, sites, inputs, fn) -> None:
    handles = []
    for site in sites:
        module = model.module.get_submodule(site.fqn)

        def hook(_mod, args, _out, site=site):
            fn(site, args[0].detach().reshape(-1, args[0].shape[-1]).float())

        handles.append(module.register_forward_hook(hook))
    try:
        for x in inputs:
            model.module(**{k: torch.from_numpy(np.asarray(v)) for k, v in x.items()})
    finally:
        for h in handles:
            h.remove()


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
