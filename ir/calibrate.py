"""Calibration activations at weight sites, on both IRs.

``collect_site_inputs(model, sites, inputs, fn)`` runs the model on each calibration input and
calls ``fn(site, x)`` with the activations the site's weight multiplies, as a float tensor: (rows,
in) for a linear site, and for a convolution (NCHW or NCL) its unfolded input patches per conv
group, (groups, rows, in/groups * kh * kw), ordered like the weight's (in/groups, kh, kw), so
``x @ W_g^T`` is the conv's output for group g. FX registers forward hooks on the sites' modules;
ONNX exposes the sites' input values as extra graph outputs for one onnxruntime session. Reducers
(``effc.ir.reducers``) fold ``x`` on the fly (column norms, Hessians), so no activation is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from effc import distributed
from effc.errors import InputError, UnsupportedError
from effc.ir.blocks import find_blocks
from effc.ir.ort import session_for
from effc.ir.sites import WeightSite
from effc.progress import bar


def _need(inputs) -> None:
    if not inputs:
        raise InputError("this pass needs calibration inputs (--calib) and none were given")


def conv_patches(
    x: torch.Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    pads: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """A conv input (N, C, H, W) or (N, C, L) as patches (groups, N * positions, C/groups * k).

    ``pads`` in ONNX order (begin dims..., end dims...); 1-D convs run as 2-D with height 1."""
    if x.dim() == 3:
        x, kernel, stride, dilation = x[:, :, None], (1, *kernel), (1, *stride), (1, *dilation)
        pads = (0, pads[0], 0, pads[1])
    if x.dim() != 4:
        raise UnsupportedError(f"calibration unfolds 1-D and 2-D convolutions, not {x.dim() - 2}-D")
    top, left, bottom, right = pads
    x = F.pad(x.float(), (left, right, top, bottom))
    cols = F.unfold(x, tuple(kernel), dilation=tuple(dilation), stride=tuple(stride))
    n, ck, positions = cols.shape
    cols = cols.view(n, groups, ck // groups, positions).permute(1, 0, 3, 2)
    return cols.reshape(groups, n * positions, ck // groups)


def _module_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise UnsupportedError(
                f"calibration of {type(module).__name__} with padding {module.padding!r} "
                f"({module.padding_mode}) is not supported"
            )
        pads = tuple(module.padding) * 2
        return conv_patches(
            x, module.kernel_size, module.stride, pads, module.dilation, module.groups
        )
    return x.detach().reshape(-1, x.shape[-1]).float()


def _node_rows(site: WeightSite, x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    if site.op != "conv":
        return t.reshape(-1, t.shape[-1])
    node = site.node
    spatial = len(site.shape) - 2

    def ints(name, default):
        return tuple(node.attributes[name].as_ints()) if name in node.attributes else default

    auto = node.attributes["auto_pad"].as_string() if "auto_pad" in node.attributes else "NOTSET"
    if auto not in ("NOTSET", "VALID"):
        raise UnsupportedError(f"calibration of Conv {node.name!r} with auto_pad={auto}")
    return conv_patches(
        t,
        tuple(site.shape[2:]),
        ints("strides", (1,) * spatial),
        ints("pads", (0,) * 2 * spatial),
        ints("dilations", (1,) * spatial),
        site.groups,
    )


def collect_site_inputs(
    model,
    sites: list[WeightSite],
    inputs: list[dict[str, np.ndarray]],
    fn: Callable[[WeightSite, torch.Tensor], None],
) -> None:
    _need(inputs)
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
    # every node reading a site's weight (a shared weight has several): its statistics sum them
    readers = {
        site.fqn: [site] + [dataclasses.replace(site, node=n) for _, n in site.users if n]
        for site in sites
    }
    values = list(dict.fromkeys(r.node.inputs[0] for rs in readers.values() for r in rs))

    def each(outs: dict[str, np.ndarray]) -> None:
        for site in sites:
            for reader in readers[site.fqn]:
                fn(site, _node_rows(reader, outs[reader.node.inputs[0].name]))

    collect_values(model, values, inputs, each)


def collect_values(model, values: list, inputs: list[dict[str, np.ndarray]], fn) -> None:
    """Run an ONNX model on each calibration input with ``values`` (onnx_ir values) exposed as
    extra graph outputs; ``fn({name: array})`` sees them, one input at a time."""
    _need(inputs)
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


CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _no_cache(kwargs: dict) -> dict:
    """A block's keyword arguments without its KV cache: an HF model run with ``use_cache`` hands
    every layer a live cache that each call appends its keys and values to, so a block called
    again on the captured arguments (calibration, BQPO's training steps) would attend over the
    keys of every earlier call, and backpropagate into their freed graphs."""
    out = dict(kwargs)
    for name in CACHE_KWARGS:
        if out.get(name) is not None:
            out[name] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def capture_block_inputs(module, block, inputs: list[dict]) -> list[tuple]:
    """(args, kwargs) that ``block`` (a submodule of ``module``) receives for each calibration
    input; the model stops there, so only the layers before the block run."""
    captured = []

    def hook(_mod, args, kwargs):
        captured.append(
            (tuple(a.detach() if torch.is_tensor(a) else a for a in args), _no_cache(kwargs))
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


def site_input(model, site: WeightSite, x: dict[str, np.ndarray]) -> torch.Tensor:
    """The rows (unfolded patches for a conv) the layer of ``site`` sees on one input. FX: the
    model stops at the layer, so only the layers before it run; ONNX (and FX graphs a structural
    pass rewrote): one whole run."""
    got: list[torch.Tensor] = []
    if model.kind == "fx" and not model.graph_modified:
        module = model.module

        def hook(mod, args):
            got.append(_module_rows(mod, args[0].detach()))
            raise _Stop

        handle = module.get_submodule(site.fqn).register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                module(**{k: torch.from_numpy(np.asarray(v)) for k, v in x.items()})
        except _Stop:
            pass
        finally:
            handle.remove()
    else:
        collect_site_inputs(model, [site], [x], lambda _s, rows: got.append(rows))
    return got[0]


def block_output(out) -> torch.Tensor:
    """A block's hidden state from what it returns (a tensor, or a tuple led by one)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _stages(model, sites: list[WeightSite]) -> list[tuple[str | None, list[WeightSite]]]:
    """(block FQN, its sites) for every repeated block in order, then (None, the sites outside
    every block: lm_head). Raises when the model has no blocks."""
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
    _need(inputs)
    shared = [s.fqn for s in sites if s.users]
    if shared:
        raise UnsupportedError(
            f"sequential calibration compresses block by block, and {shared[0]} is shared by "
            f"several blocks ({len(shared)} weights): use sequential=false"
        )
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


def compress_sequentially(model, sites, inputs, acc, compress_site, what: str) -> int:
    """``compress_site(site, acc.pop(site.fqn))`` for every site, block by block, each block
    calibrated on the already compressed ones (``calibrate_sequentially``), with a progress bar;
    ``acc``: the calibration reducer (``effc.ir.reducers``). Returns the number of stages (the
    passes' ``sequential=true``)."""
    progress, task = bar(len(sites), f"{what}: sequential")
    with progress:
        return calibrate_sequentially(
            model,
            sites,
            distributed.shard(inputs),
            acc,
            lambda stage: [compress_site(site, acc.pop(site.fqn)) for site in stage],
            lambda stage: progress.advance(task, len(stage)),
        )


def _collect_fx_on(module, sites, run, fn) -> None:
    """``fn(site, x)`` for every call of the sites' modules during ``run()``."""
    handles = []
    for site in sites:
        for fqn in [site.fqn, *(f for f, _ in site.users)]:  # every layer using the weight
            sub = module.get_submodule(fqn)

            def hook(mod, args, _out, site=site):
                fn(site, _module_rows(mod, args[0].detach()))

            handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
