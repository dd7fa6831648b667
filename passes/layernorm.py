"""layernorm: LayerNorm in deployment-friendly forms (DITN), one mode per trade-off.

- ``exact`` (default; ONNX, an FX model is lowered first): decomposed LayerNorm chains
  (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div, as the legacy exporter writes them) fused into
  one ``LayerNormalization`` (opset raised to 18 where lower), and channel LayerNorms of NCHW
  tensors (to_3d / LayerNorm / to_4d) rewritten transpose-free: ``form=reduce`` (ReduceMean
  over axis 1), ``form=conv`` (two 1x1 convs: centring and variance), or ``form=auto`` (default:
  the faster of the two under onnxruntime at each site's shape, timed by the pass and listed in
  the report). Same math; outputs within fp32 rounding. (On FX there is nothing to fuse: torch.export
  already gives ``aten.layer_norm``; the form that matters is the deployed graph's.)
- ``affine`` (calibrated, FX and ONNX): each LayerNorm becomes y = a * x + b per channel, the
  least-squares fit of its outputs on its inputs over the calibration data; ``fuse`` then folds
  a and b into the neighbouring linear / 1x1 conv. Lossy: the report gives the output error.
- ``rms`` (calibrated, FX and ONNX): LayerNorm -> RMSNorm (no mean subtraction) where the
  calibrated per-token mean is negligible: mean |mu_t| / rms_t <= ``max_mean_ratio``.
- ``tanh`` (trained, FX only): LayerNorm -> tanh(s * x + t) then a learnable 1x1 conv / linear
  (initialised to the LayerNorm's affine), then the new parameters are distilled from the
  original model on the calibration inputs (``steps``, ``lr``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from torch import nn

from effc.errors import InputError
from effc.inputs import DEFAULT_BATCH, DEFAULT_SPATIAL
from effc.ir.calibrate import collect_values
from effc.pass_base import Pass, PassResult
from effc.passes._train import train
from effc.passes.layernorm_onnx import (
    CHANNEL_FORMS,
    ensure_opset,
    find_sites,
    fuse_decomposed,
    time_channel_forms,
    write_affine,
    write_rms,
)
from effc.registry import register


class _Stats:
    """Per-channel running sums of x, y = LN(x) and x*y over rows, plus the mean ratio."""

    def __init__(self, gamma: np.ndarray, beta: np.ndarray, eps: float):
        self.gamma, self.beta, self.eps = gamma.astype(np.float64), beta.astype(np.float64), eps
        self.n = 0
        self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.ratio_sum = self.mu_sum = self.sigma_sum = 0.0

    def add(self, rows: np.ndarray) -> None:
        x = rows.astype(np.float64)
        mu = x.mean(1, keepdims=True)
        var = ((x - mu) ** 2).mean(1, keepdims=True)
        y = (x - mu) / np.sqrt(var + self.eps) * self.gamma + self.beta
        self.n += len(x)
        self.sx, self.sy = self.sx + x.sum(0), self.sy + y.sum(0)
        self.sxx, self.sxy = self.sxx + (x * x).sum(0), self.sxy + (x * y).sum(0)
        rms = np.sqrt((x * x).mean(1) + self.eps)
        self.ratio_sum += float((np.abs(mu[:, 0]) / rms).sum())
        self.mu_sum += float(mu.sum())
        self.sigma_sum += float(np.sqrt(var + self.eps).sum())

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        mx, my = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mx * mx
        a = np.where(var > 1e-12, (self.sxy / self.n - mx * my) / np.maximum(var, 1e-12), 0.0)
        return a, my - a * mx

    @property
    def mean_ratio(self) -> float:
        return self.ratio_sum / max(self.n, 1)


def _rows(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.moveaxis(x, axis, -1) if axis != -1 else x
    return x.reshape(-1, x.shape[-1])


class ChannelAffine(nn.Module):
    """y = a * x + b along the last axis (the calibrated stand-in for a LayerNorm)."""

    def __init__(self, a: np.ndarray, b: np.ndarray):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float32), requires_grad=False)
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a + self.b


class RMSFromLayerNorm(nn.Module):
    """The LayerNorm's affine around an RMS normalisation: g * x / rms(x) + b."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y * self.weight if self.weight is not None else y
        return y + self.bias if self.bias is not None else y


class TanhLinear(nn.Module):
    """tanh(s * x + t) then a learnable linear map over the last axis (a 1x1 conv on NCHW)."""

    def __init__(self, ln: nn.LayerNorm, scale: float, shift: float):
        super().__init__()
        c = ln.normalized_shape[-1]
        self.scale = nn.Parameter(torch.full((c,), scale))
        self.shift = nn.Parameter(torch.full((c,), shift))
        self.proj = nn.Linear(c, c)
        with torch.no_grad():
            gamma = ln.weight if ln.weight is not None else torch.ones(c)
            self.proj.weight.copy_(torch.diag(gamma.detach()))
            self.proj.bias.copy_(ln.bias.detach() if ln.bias is not None else torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(x * self.scale + self.shift))


def _layernorms(module: nn.Module) -> list[tuple[str, nn.LayerNorm]]:
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1
    ]


def _set(module: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, new)


@torch.no_grad()
def _fx_stats(model, ctx, norms) -> dict[str, _Stats]:
    stats = {
        name: _Stats(
            (ln.weight if ln.weight is not None else torch.ones(ln.normalized_shape)).numpy(),
            (ln.bias if ln.bias is not None else torch.zeros(ln.normalized_shape)).numpy(),
            ln.eps,
        )
        for name, ln in norms
    }
    handles = [
        ln.register_forward_hook(
            lambda _m, args, _o, name=name: stats[name].add(_rows(args[0].float().numpy(), -1))
        )
        for name, ln in norms
    ]
    try:
        for x in ctx.calibration:
            model.module(**{k: torch.from_numpy(np.asarray(v)) for k, v in x.items()})
    finally:
        for h in handles:
            h.remove()
    return stats


def _distill(
    student: nn.Module, teacher: nn.Module, params: list, ctx, steps: int, lr: float
) -> list[float]:
    inputs = [{k: torch.from_numpy(np.asarray(v)) for k, v in x.items()} for x in ctx.calibration]

    def outputs(model, x) -> list[torch.Tensor]:  # every float tensor of the output structure
        flat, _ = torch.utils._pytree.tree_flatten(model(**x))
        return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]

    with torch.no_grad():
        targets = [outputs(teacher, x) for x in inputs]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(ctx.seed)

    def loss_of(_step: int) -> torch.Tensor:
        i = int(torch.randint(len(inputs), (1,), generator=g))
        pairs = zip(outputs(student, inputs[i]), targets[i])
        return sum(nn.functional.mse_loss(s, t) for s, t in pairs)

    log = train(
        [{"params": params}], loss_of, steps, lr, cosine=False, label="layernorm{mode=tanh}"
    )
    for p in params:
        p.requires_grad_(False)
    return log.losses


def _timing_shape(shape) -> tuple[int, ...] | None:
    """A concrete NCHW shape to time a channel LayerNorm at: symbolic dims by effc's default rule
    (batch 1, spatial 64; the channels are always static at a channel site)."""
    if shape is None or len(shape) != 4:
        return None
    defaults = (DEFAULT_BATCH, None, DEFAULT_SPATIAL, DEFAULT_SPATIAL)
    dims = tuple(d if isinstance(d, int) and d > 0 else defaults[i] for i, d in enumerate(shape))
    return None if None in dims else dims


@register
class LayerNorm(Pass):
    """LayerNorm -> fused/transpose-free (exact), per-channel affine, RMSNorm, or tanh + 1x1."""

    name = "layernorm"

    @dataclass
    class Options:
        mode: Literal["exact", "affine", "rms", "tanh"] = "exact"
        form: Literal["auto", "reduce", "conv"] = "auto"  # exact channel LayerNorm on NCHW
        max_mean_ratio: float = 0.1
        steps: int = 300
        lr: float = 0.002

    lossy = True  # the calibrated and trained modes; ``exact`` is not (set per instance below)

    def needs_calibration(self) -> bool:
        return self.options.mode != "exact"

    def validate(self) -> None:
        mode = self.options.mode
        # exact rewrites ONNX graphs: an FX model is lowered first; tanh trains a torch model
        self.kinds = {"exact": ("onnx",), "tanh": ("fx",)}.get(mode, ("fx", "onnx"))
        self.lossy = mode != "exact"

    def run(self, model, ctx) -> PassResult:
        mode = self.options.mode
        if mode != "exact" and not ctx.calibration:
            raise InputError(f"layernorm{{mode={mode}}} needs calibration inputs (--calib)")
        return self._run_onnx(model, ctx) if model.kind == "onnx" else self._run_fx(model, ctx)

    def _run_onnx(self, model, ctx) -> PassResult:
        graph = model.model.graph
        stats: dict = {"decomposed_fused": fuse_decomposed(model.model)}
        sites = find_sites(model.model)
        stats.update(sites=len(sites), channel_sites=sum(s.channel for s in sites))
        if sites and ensure_opset(model.model):
            stats["opset"] = "raised to 18"

        mode = self.options.mode
        if mode == "exact":
            stats.update(self._channel_exact(graph, sites))
        else:
            acc = {id(s): _Stats(s.gamma, s.beta, s.eps) for s in sites}

            def each(outs):
                for s in sites:
                    acc[id(s)].add(_rows(outs[s.x.name], s.axis))

            collect_values(model, [s.x for s in sites], ctx.calibration, each)
            stats.update(self._substitute_onnx(graph, sites, acc))
        RemoveUnusedNodesPass()(model.model)
        changed = bool(stats["decomposed_fused"]) or any(
            stats.get(k) for k in ("channel_rewritten", "replaced")
        )
        return PassResult(model, changed, stats)

    def _channel_exact(self, graph, sites) -> dict:
        """Each channel site in the form ``form`` names, or (auto) the faster of the two under
        onnxruntime at the site's shape, timed here."""
        chosen = {}
        for site in sites:
            if not site.channel:
                continue
            form = self.options.form
            shape = _timing_shape(site.x.shape)
            if form == "auto" and shape is None:  # not even the rank is known: no timing
                form = "reduce"
                chosen[site.name] = {"form": form, "timed": "no (unknown shape)"}
            elif form == "auto":
                ms = time_channel_forms(shape)
                form = min(ms, key=ms.get)
                chosen[site.name] = {"form": form, **{k: round(v, 3) for k, v in ms.items()}}
                if shape != tuple(site.x.shape):
                    chosen[site.name]["timed_at"] = "x".join(map(str, shape))
            else:
                chosen[site.name] = {"form": form}
            CHANNEL_FORMS[form](graph, site)
        return {"channel_rewritten": len(chosen), "forms": chosen}

    def _substitute_onnx(self, graph, sites, acc) -> dict:
        replaced, ratios = 0, {}
        for site in sites:
            st = acc[id(site)]
            ratios[site.name] = round(st.mean_ratio, 4)
            if self.options.mode == "affine":
                write_affine(graph, site, *st.affine())
                replaced += 1
            elif st.mean_ratio <= self.options.max_mean_ratio:
                write_rms(graph, site)
                replaced += 1
        return {"replaced": replaced, "mean_ratio": ratios}

    def _run_fx(self, model, ctx) -> PassResult:
        norms = _layernorms(model.module)
        if not norms:
            return PassResult(model, False, {"sites": 0})
        mode = self.options.mode
        stats: dict = {"sites": len(norms)}
        acc = _fx_stats(model, ctx, norms)
        if mode == "tanh":
            teacher = copy.deepcopy(model.module).eval()
            params = []
            for name, ln in norms:
                st = acc[name]
                scale = st.n / max(st.sigma_sum, 1e-12)
                new = TanhLinear(ln, scale, -st.mu_sum / st.n * scale)
                params += list(new.parameters())
                _set(model.module, name, new)
            losses = _distill(
                model.module, teacher, params, ctx, self.options.steps, self.options.lr
            )
            stats.update(
                replaced=len(norms),
                distill={
                    "steps": self.options.steps,
                    "lr": self.options.lr,
                    "mse_first": losses[0] if losses else None,
                    "mse_last": float(np.mean(losses[-10:])) if losses else None,
                },
            )
        else:
            replaced, ratios = 0, {}
            for name, ln in norms:
                st = acc[name]
                ratios[name] = round(st.mean_ratio, 4)
                if mode == "affine":
                    _set(model.module, name, ChannelAffine(*st.affine()))
                    replaced += 1
                elif st.mean_ratio <= self.options.max_mean_ratio:
                    _set(model.module, name, RMSFromLayerNorm(ln))
                    replaced += 1
            stats.update(replaced=replaced, mean_ratio=ratios)
        model.retrace()
        return PassResult(model, stats.get("replaced", 0) > 0, stats)
