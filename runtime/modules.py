"""Torch modules that run BSR weights, swapped in for ``nn.Linear`` in the user's own model so an
HF model keeps ``generate()``. The forward pass reads only the packed bytes (no dense weight)."""

from __future__ import annotations

import time

import torch
from torch import nn

from effc.runtime.format import BSRMatrix, from_quantized


class BSRLinear(nn.Module):
    """y = x W^T + b with W stored as BSR (1 x g int4/int8 blocks)."""

    def __init__(self, matrix: BSRMatrix, bias: torch.Tensor | None = None):
        super().__init__()
        matrix.validate()
        self.out_features, self.in_features = matrix.shape
        self.group, self.bits = matrix.group, matrix.bits
        for name, t in matrix.tensors().items():
            self.register_buffer(name, t)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    @property
    def matrix(self) -> BSRMatrix:
        return BSRMatrix(
            (self.out_features, self.in_features),
            self.group,
            self.bits,
            self.indptr,
            self.indices,
            self.values,
            self.scales,
            self.zeros,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from effc.runtime.cpu import kernels

        shape = x.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.to(torch.float32).contiguous()
        y = kernels().bsr_linear(
            x2,
            self.indptr,
            self.indices,
            self.values,
            self.scales,
            self.zeros,
            self.out_features,
            self.group,
            self.bits,
        )
        if self.bias is not None:
            y = y + self.bias
        if x.dim() != 2:
            y = y.reshape(*shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        m = self.matrix
        return (
            f"in={self.in_features}, out={self.out_features}, group={self.group}, bits={self.bits}, "
            f"density={m.density:.3f}"
        )


def matrix_from_annotations(notes: dict) -> BSRMatrix:
    """Pack a site's quantization (and pruning mask, if any) into BSR."""
    codes, scale, zero = notes["codes"], notes["scale"], notes["zero"]
    mask = notes.get("mask")
    if mask is None:
        mask = torch.ones(scale.shape, dtype=torch.bool)
    return from_quantized(codes, scale, zero, mask, notes["bits"])


def _time(fn, *args, reps: int = 10) -> float:
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - t0) / reps * 1e3


@torch.no_grad()
def measure_choice(matrix: BSRMatrix, batch: int) -> dict:
    """Time the BSR kernel against dense fp32 ``F.linear`` of the same shape at ``batch`` rows;
    the layer goes sparse only where the kernel is not slower."""
    from effc.runtime.cpu import kernels

    out, inp = matrix.shape
    x = torch.randn(batch, inp)
    args = (
        matrix.indptr,
        matrix.indices,
        matrix.values,
        matrix.scales,
        matrix.zeros,
        out,
        matrix.group,
        matrix.bits,
    )
    sparse = _time(kernels().bsr_linear, x, *args)
    dense = _time(torch.nn.functional.linear, x, torch.randn(out, inp))
    return {
        "sparse_ms": sparse,
        "dense_ms": dense,
        "choice": "sparse" if sparse <= dense else "dense",
    }


@torch.no_grad()
def swap_linears(
    module: nn.Module, annotations: dict[str, dict], batch: int = 1, decide: bool = True
) -> list[dict]:
    """Replace every quantized ``nn.Linear`` of ``module`` by a ``BSRLinear``; return one record per
    layer. With ``decide``, a layer whose BSR kernel is slower than dense ``F.linear`` at ``batch``
    rows stays dense (its fake-quantized fp32 weight), and the record says so with both timings."""
    records = []
    for fqn, notes in annotations.items():
        if "codes" not in notes or notes.get("bits") not in (4, 8):
            continue
        linear = module.get_submodule(fqn)
        if not isinstance(linear, nn.Linear):
            continue
        bsr = BSRLinear(matrix_from_annotations(notes), linear.bias)
        record = {
            "layer": fqn,
            "shape": [bsr.out_features, bsr.in_features],
            "density": bsr.matrix.density,
            "bytes": bsr.matrix.nbytes(),
            "dense_bytes": linear.weight.numel() * 4,
        }
        record.update(measure_choice(bsr.matrix, batch) if decide else {"choice": "sparse"})
        if record["choice"] == "sparse":
            parent, _, leaf = fqn.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, bsr)
        records.append(record)
    return records
