"""quantize: weight-only group quantization (GQSA's quantization half; also W2/W3/W8 baselines).

Per group of g weights along a row's input dimension, codes q in [0, 2^b - 1] with
    W ~= scale * (q - zero)
asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min / scale);
symmetric:  scale = absmax / (2^(b-1) - 1), zero = 2^(b-1).
Scales are rounded to fp16 first (what the BSR format stores), so the fake-quantized weights the
model carries equal what the kernels compute.

method=rtn rounds to nearest. method=gptq quantizes column by column and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
calibration inputs (H = X^T X), recomputing group parameters from the updated weights (GPTQ,
Frantar et al. 2022). Groups a previous ``group-prune`` removed stay exactly zero (their codes are
not stored), and the groups must coincide with the pruning groups (``requires``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from effc.errors import PassOptionError, UnsupportedError
from effc.ir.calibrate import compress_sequentially
from effc.ir.reducers import HessianSum, hessians
from effc.ir.sites import (
    compressible_sites,
    embedding_sites,
    file_view,
    read_weight,
    write_weight,
)
from effc.pass_base import Pass, PassResult
from effc.passes._obs import inverse_hessian_factor, obs_sweep
from effc.registry import register


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., g) groups -> fp16-exact float scale and zero of shape (...)."""
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = w.abs().amax(-1) / (half - 1)
        zero = torch.full_like(scale, half)
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / scale.clamp_min(1e-12)).clamp(0, qmax)
    scale = scale.half().float()
    # An all-zero group (pruned) or one whose scale underflows fp16 gets scale 1: its codes all
    # equal the zero point, so it dequantizes to exactly 0.
    return torch.where(scale > 0, scale, torch.ones_like(scale)), zero


def quantize_groups(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Codes for groups ``w`` (..., g) with per-group ``scale``/``zero`` (...)."""
    return torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, 2**bits - 1)


def rtn(weight: torch.Tensor, bits: int, group: int, symmetric: bool):
    """(out, in) -> codes (out, in/g, g), scale, zero (out, in/g)."""
    out, inp = weight.shape
    w = weight.float().view(out, inp // group, group)
    scale, zero = group_params(w, bits, symmetric)
    return quantize_groups(w, scale, zero, bits), scale, zero


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group: int,
    symmetric: bool,
    mask: torch.Tensor | None = None,
    block: int = 128,
    damp: float = 0.01,
):
    """GPTQ with per-group parameters; pruned groups (mask False) are forced to exact zero (and,
    when the weight still holds them, their removal is compensated like rounding error)."""
    out, inp = weight.shape
    U, dead = inverse_hessian_factor(hessian, damp)
    W = weight.float().clone()
    W[:, dead] = 0
    keep = (
        mask.repeat_interleave(group, dim=1)
        if mask is not None
        else torch.ones(out, inp, dtype=torch.bool)
    )
    codes = torch.zeros(out, inp)
    scales = torch.zeros(out, inp // group)
    zeros = torch.zeros(out, inp // group)

    def target(col, W1, i):
        g = col // group
        if col % group == 0:
            scales[:, g], zeros[:, g] = group_params(
                W1[:, i : i + group] * keep[:, col : col + group], bits, symmetric
            )
        q = quantize_groups(W1[:, i : i + 1], scales[:, g], zeros[:, g], bits)[:, 0]
        codes[:, col] = q
        return torch.where(keep[:, col], scales[:, g] * (q - zeros[:, g]), torch.zeros(()))

    obs_sweep(W, U, target, block, group)
    return codes.view(out, inp // group, group), scales, zeros


def dequantize(codes, scale, zero, mask=None) -> torch.Tensor:
    w = scale[..., None] * (codes - zero[..., None])
    if mask is not None:
        w = w * mask[..., None]
    return w.reshape(w.shape[0], -1)


@register
class Quantize(Pass):
    """Weight-only group quantization (int2/3/4/8, per-group scale and zero; RTN or GPTQ)."""

    name = "quantize"
    lossy = True

    @dataclass
    class Options:
        bits: Literal[2, 3, 4, 8] = 4
        group: int = 16
        symmetric: bool = False
        method: Literal["rtn", "gptq"] = "rtn"
        skip: list[str] = field(default_factory=list)
        sequential: bool = False  # gptq: calibrate each block on the already quantized ones
        # embedding tables: fp32 (a tied lm_head is untied and quantized alone), tied (a tied
        # lm_head stays tied: its quantized weight is the table too, stored once), int8/int4
        # (the tables quantized by rows in groups of ``group``, dequantized on lookup)
        embeddings: Literal["fp32", "tied", "int8", "int4"] = "fp32"

    def needs_calibration(self) -> bool:
        return self.options.method == "gptq"

    def validate(self) -> None:
        if self.options.group < 2:
            raise PassOptionError(
                f"pass 'quantize': option 'group' must be >= 2, got {self.options.group}"
            )
        if self.options.sequential and self.options.method != "gptq":
            raise PassOptionError(
                "pass 'quantize': sequential=true calibrates GPTQ's Hessians; use method=gptq"
            )

    def requires(self, model, ctx) -> None:
        for fqn, state in model.compression.sites.items():
            if state.mask is not None and state.group != self.options.group:
                raise UnsupportedError(
                    f"pass 'quantize': group {self.options.group} does not coincide with the pruning group "
                    f"{state.group} of {fqn}; use the same group for both"
                )

    def run(self, model, ctx) -> PassResult:
        o = self.options
        stats: dict = {}
        tied = o.embeddings == "tied"
        sites = compressible_sites(model, o.skip, stats, o.group, f"group {o.group}", tied)
        err = [0.0, 0.0]  # squared error, squared reference

        def quantize_site(site, hessian: torch.Tensor | None) -> None:
            w = read_weight(site).float()
            state = model.compression.site(site.fqn)
            mask = state.mask
            if hessian is not None:
                codes, scale, zero = gptq(w, hessian, o.bits, o.group, o.symmetric, mask)
            else:
                codes, scale, zero = rtn(w, o.bits, o.group, o.symmetric)
            deq = dequantize(codes, scale, zero, mask)
            err[0] += float(((deq - w) ** 2).sum())
            err[1] += float((w**2).sum())
            if state.original is None:  # a weight still in its external-data file stays there
                view = file_view(site)
                state.original = w.clone() if view is None else view
            codes, zero = codes.to(torch.uint8), zero.to(torch.uint8)
            # ONNX: the fp32 weight is made from the codes when read, not held beside them
            write_weight(
                site, deq, remake=lambda: dequantize(codes.float(), scale, zero.float(), mask)
            )
            state.codes, state.scale, state.zero = codes, scale, zero
            state.bits, state.group = o.bits, o.group

        if o.sequential:
            stats["stages"] = compress_sequentially(
                model, sites, ctx.calibration, HessianSum(), quantize_site, "quantize (GPTQ)"
            )
        else:
            H = hessians(model, sites, ctx.calibration) if o.method == "gptq" else {}
            for site in sites:
                quantize_site(site, H.pop(site.fqn, None))
        if o.embeddings in ("int8", "int4"):
            stats["embeddings"] = self._quantize_tables(model, int(o.embeddings[3:]))
        err_sq, ref_sq = err
        stats.update(
            layers=len(sites),
            bits=o.bits,
            weight_rel_error=round((err_sq / max(ref_sq, 1e-30)) ** 0.5, 6),
        )
        return PassResult(model, bool(sites), stats)

    def _quantize_tables(self, model, bits: int) -> list[dict]:
        """Round-to-nearest codes for every embedding table not listed in ``skip``, by rows in
        groups of ``group`` along the hidden size; the relative error per table."""
        o = self.options
        done = []
        for site in embedding_sites(model):
            if any(p in site.fqn for p in o.skip) or site.shape[1] % o.group:
                continue
            w = read_weight(site).float()
            codes, scale, zero = rtn(w, bits, o.group, o.symmetric)
            deq = dequantize(codes, scale, zero)
            # before the write: on FX ``w`` shares the parameter's storage
            rel = float(((deq - w) ** 2).sum() / (w**2).sum().clamp_min(1e-30)) ** 0.5
            state = model.compression.site(site.fqn)
            state.original = w.clone()
            write_weight(site, deq)
            state.codes, state.scale, state.zero = (
                codes.to(torch.uint8),
                scale,
                zero.to(torch.uint8),
            )
            state.bits, state.group = bits, o.group
            done.append({"table": site.fqn, "bits": bits, "weight_rel_error": round(rel, 6)})
        return done
