"""rearrange: channel rearrangement so that 1 x g pruning groups hold weights of like importance
(SparseByteNN's whole-network rearrangement, applied to GQSA's groups). Lossless.

A linear layer's input channels can be reordered for free when every producer of that input is
itself a linear layer reached only through channel-wise (elementwise) ops: a SwiGLU MLP's
``down_proj(silu(gate_proj(x)) * up_proj(x))`` is one. Permuting down_proj's columns by ``p`` and
gate_proj's and up_proj's rows (and biases) by the same ``p`` computes the same function (only
the order of the summation changes). Such a region is found by walking back from the consumer's
input through elementwise ops (silu, gelu, relu, sigmoid, tanh, mul, add, sub, clone) to linear
producers; every value on the way must feed only the region, else the region is left alone.

Which order: 1 x g groups along a row are pruned whole, so a group that mixes important and
unimportant inputs costs the most. With the OBS saliency of every weight, s[r, j] = W[r, j]^2 *
H[j, j] (H = X^T X of the calibration inputs), each input column j has a profile over the rows
(s[:, j], each row normalised to sum 1, centred). Columns with similar profiles matter to the same
rows, so grouping them lets each row keep whole groups of what it needs. Candidates:
    identity:  the current order;
    pca:       columns sorted by the first principal component of their profiles;
    bisect:    recursive balanced bisection by the first principal component until groups of g
               (a balanced clustering into groups of exactly g columns).
Each candidate is scored by the consumer's relative output error after OBS group pruning at the
probe ``sparsity`` (the same OBS functions group-prune uses, on the calibration Hessian), and the
best is applied; the identity is kept unless another order is strictly better. The report lists
each region's choice and its probe error before and after.

Must run before group-prune/quantize (they record masks and quantization per column position).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from effc.errors import PassOptionError, UnsupportedError
from effc.ir.model import attr_tensor
from effc.ir.reducers import hessians
from effc.ir.sites import fx_fqn, weight_sites
from effc.pass_base import Pass, PassResult
from effc.passes._channels import (
    bisect_order,
    kept_importance,
    output_scales,
    pca_order,
    row_orders,
)
from effc.passes._channels import (
    fx_regions as channel_regions_fx,
)
from effc.passes._channels import (
    onnx_regions as channel_regions_onnx,
)
from effc.passes._obs import inverse_hessian_factor, layer_error, obs_prune, obs_scores
from effc.passes.group_prune import row_mask
from effc.registry import register

aten = torch.ops.aten
_UNARY = {
    aten.silu.default,
    aten.gelu.default,
    aten.relu.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.clone.default,
    aten.alias.default,
}
_BINARY = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor}


# ---------------------------------------------------------------- math (torch)
def saliency_profiles(weight: torch.Tensor, hessian_diag: torch.Tensor) -> torch.Tensor:
    """(out, in): column j's OBS saliency over the rows, each row normalised to sum 1, then
    centred per row and each column scaled to unit norm."""
    s = weight.double() ** 2 * hessian_diag.double().clamp_min(0)[None, :]
    s = s / s.sum(1, keepdim=True).clamp_min(1e-30)
    c = s - s.mean(1, keepdim=True)
    return c / c.norm(dim=0, keepdim=True).clamp_min(1e-30)


def probe_error(weight: torch.Tensor, hessian: torch.Tensor, group: int, sparsity: float) -> float:
    """Relative output error of the layer after OBS 1 x ``group`` pruning at ``sparsity`` (row
    budget), the cost a rearrangement is chosen by."""

    factor = inverse_hessian_factor(hessian)
    scores = obs_scores(weight, factor[0], factor[1], group)
    mask = row_mask(scores, round((1 - sparsity) * scores.numel()))
    return layer_error(weight, obs_prune(weight, factor, mask, group), hessian)


def choose_order(
    weight: torch.Tensor, hessian: torch.Tensor, group: int, sparsity: float
) -> tuple[str, torch.Tensor, dict[str, float]]:
    """The candidate order with the lowest probe error: (name, permutation, every error)."""
    profiles = saliency_profiles(weight, torch.diag(hessian))
    candidates = {
        "identity": torch.arange(weight.shape[1]),
        "pca": pca_order(profiles),
        "bisect": bisect_order(profiles, group),
    }
    errors = {
        k: probe_error(weight[:, p], hessian[p][:, p], group, sparsity)
        for k, p in candidates.items()
    }
    best = min(errors, key=lambda k: (errors[k], k != "identity"))
    return best, candidates[best], errors


# ---------------------------------------------------------------- FX adapter
@dataclass
class Region:
    """A consumer linear whose input channels the producers' output rows can absorb."""

    consumer: str  # FQN
    weight: torch.Tensor  # the consumer's (out, in) parameter
    producers: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)  # producers' weights and biases


def fx_regions(model) -> list[Region]:
    """Every rearrangeable region of an FX model (see the module docstring)."""

    gm = model.graph_module
    linears = {
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target == aten.linear.default
        and getattr(n.args[1], "op", None) == "get_attr"
    }
    weight_uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            weight_uses[n.target] = weight_uses.get(n.target, 0) + len(n.users)

    regions = []
    for consumer in linears:
        start = consumer.args[0]
        inner: set = set()
        producers: list = []
        stack, ok = [start], True
        while stack and ok:
            n = stack.pop()
            if n in inner or n in producers:
                continue
            if n in linears:
                producers.append(n)
            elif getattr(n, "op", None) == "call_function" and n.target in _UNARY:
                inner.add(n)
                stack.append(n.args[0])
            elif getattr(n, "op", None) == "call_function" and n.target in _BINARY:
                inner.add(n)
                args = [a for a in n.args[:2] if isinstance(a, torch.fx.Node)]
                ok = len(args) == 2 or (len(args) == 1 and not isinstance(n.args[1], torch.fx.Node))
                stack.extend(args)
            else:
                ok = False
        if not ok or not producers:
            continue
        members = inner | set(producers)
        # every value feeds only the region; members are ancestors of the start value, so this
        # also leaves the consumer as the start value's only user
        if any(u not in members and u is not consumer for m in members for u in m.users):
            continue
        # every producer and intermediate has the consumer's input width as its last dim
        width = attr_tensor(gm, consumer.args[1].target).shape[1]
        shapes = [m.meta.get("val") for m in members]
        if any(v is None or v.shape[-1] != width for v in shapes):
            continue
        params = [consumer.args[1]] + [p.args[1] for p in producers]
        params += [p.args[2] for p in producers if len(p.args) > 2 and p.args[2] is not None]
        if any(getattr(p, "op", None) != "get_attr" or weight_uses[p.target] != 1 for p in params):
            continue  # tied or shared parameters would see the permutation elsewhere
        tensors = [attr_tensor(gm, p.target) for p in params]
        regions.append(
            Region(
                fx_fqn(consumer, consumer.args[1].target),
                tensors[0],
                [fx_fqn(p, p.args[1].target) for p in producers],
                tensors[1:],
            )
        )
    return sorted(regions, key=lambda r: r.consumer)


@register
class Rearrange(Pass):
    """Reorder channels between linear layers so 1 x g groups hold weights of like importance."""

    name = "rearrange"
    kinds = ("fx", "onnx")

    @dataclass
    class Options:
        target: Literal["groups", "blocks"] = "groups"
        group: int = 16
        rows: int = 8
        sparsity: float = 0.5
        skip: list[str] = field(default_factory=list)

    def needs_calibration(self) -> bool:
        return self.options.target == "groups"

    def validate(self) -> None:
        o = self.options
        if o.group < 1:
            raise PassOptionError(f"pass 'rearrange': option 'group' must be >= 1, got {o.group}")
        if not 0.0 < o.sparsity < 1.0:
            raise PassOptionError(
                f"pass 'rearrange': option 'sparsity' must be in (0, 1), got {o.sparsity}"
            )
        if o.rows < 1:
            raise PassOptionError(f"pass 'rearrange': option 'rows' must be >= 1, got {o.rows}")

    def run(self, model, ctx) -> PassResult:

        o = self.options
        if o.target == "blocks":
            return self._run_blocks(model)
        if model.kind != "fx":
            raise UnsupportedError(
                "pass 'rearrange': target=groups (SwiGLU MLP regions) runs on FX models; "
                "target=blocks (CNN channel regions) runs on FX and ONNX"
            )
        regions = [
            r
            for r in fx_regions(model)
            if not any(s in name for s in o.skip for name in [r.consumer, *r.producers])
            and r.weight.shape[1] % o.group == 0
            and r.weight.shape[1] > o.group
        ]
        touched = [n for r in regions for n in [r.consumer, *r.producers]]
        done = [n for n in touched if model.compression.is_compressed(n)]
        if done:
            raise UnsupportedError(
                f"pass 'rearrange' must run before pruning and quantization ({done[0]} is "
                "already compressed)"
            )
        consumers = {r.consumer for r in regions}
        sites = [s for s in weight_sites(model) if s.fqn in consumers]
        hess = hessians(model, sites, ctx.calibration) if sites else {}
        chosen: dict[str, dict] = {}
        for r in regions:
            w = r.weight.detach().float()
            name, perm, errors = choose_order(w, hess[r.consumer], o.group, o.sparsity)
            chosen[r.consumer] = {
                "order": name,
                "producers": r.producers,
                "probe_error": {k: float(f"{v:.4g}") for k, v in errors.items()},
            }
            if name == "identity":
                continue
            model.compression.site(r.consumer).permutation = perm
            with torch.no_grad():
                r.weight.copy_(r.weight[:, perm])
                for t in r.tensors:
                    t.copy_(t[perm])
        moved = sum(v["order"] != "identity" for v in chosen.values())
        before = sum(v["probe_error"]["identity"] for v in chosen.values())
        after = sum(v["probe_error"][v["order"]] for v in chosen.values())
        stats = {
            "regions": len(regions),
            "rearranged": moved,
            "probe_sparsity": o.sparsity,
            "probe_error_sum": {"before": float(f"{before:.4g}"), "after": float(f"{after:.4g}")},
            "layers": chosen,
        }
        return PassResult(model, moved > 0, stats)

    def _run_blocks(self, model) -> PassResult:
        """CNN channel regions: permute each producer's output channels (and everything that
        carries them to the consumer) so its rows x 1 blocks hold rows of like importance."""
        o = self.options
        sites = weight_sites(model)
        if model.kind == "fx":
            regions = channel_regions_fx(model)
        else:
            regions = channel_regions_onnx(model, {id(s.node): s.fqn for s in sites})
        regions = [
            r
            for r in regions
            if not any(s in n for s in o.skip for n in (r.producer, r.consumer))
            and r.channels % o.rows == 0
            and r.channels > o.rows
        ]
        done = [
            n
            for r in regions
            for n in (r.producer, r.consumer)
            if model.compression.is_compressed(n)
        ]
        if done:
            raise UnsupportedError(
                f"pass 'rearrange' must run before pruning and quantization ({done[0]} is "
                "already compressed)"
            )
        chosen: dict[str, dict] = {}
        scales = output_scales(model)
        for r in regions:
            scores = r.weight().abs()
            if r.producer in scales:
                scores = scores * scales[r.producer][:, None]
            orders = row_orders(scores, o.rows)
            kept = {k: kept_importance(scores[p], o.rows, o.sparsity) for k, p in orders.items()}
            best = max(kept, key=lambda k: (kept[k], k == "identity"))
            chosen[r.producer] = {
                "order": best,
                "consumer": r.consumer,
                "through": r.members,
                "kept_importance": {k: round(v, 4) for k, v in kept.items()},
            }
            if best != "identity":
                r.apply(orders[best])
                model.compression.site(r.producer).permutation = orders[best]
        if model.kind == "fx" and any(v["order"] != "identity" for v in chosen.values()):
            model.retrace()
        moved = sum(v["order"] != "identity" for v in chosen.values())
        before = [v["kept_importance"]["identity"] for v in chosen.values()]
        after = [v["kept_importance"][v["order"]] for v in chosen.values()]
        stats = {
            "target": "blocks",
            "rows": o.rows,
            "regions": len(regions),
            "rearranged": moved,
            "probe_sparsity": o.sparsity,
            "block_occupancy": {  # mean share of |W| kept by rows x 1 blocks at the probe
                "before": round(sum(before) / max(len(before), 1), 4),
                "after": round(sum(after) / max(len(after), 1), 4),
            },
            "layers": chosen,
        }
        return PassResult(model, moved > 0, stats)
