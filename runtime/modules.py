"""Torch modules that run BSR weights, swapped in for ``nn.Linear`` in the user's own model so an
HF model keeps ``generate()``. The forward pass reads only the packed bytes (no dense weight)."""

from __future__ import annotations

import torch
from torch import nn

from effc.errors import UnsupportedError
from effc.ir.compression import CompressionState, SiteState
from effc.runtime.cpu import kernels
from effc.runtime.format import BSRMatrix, from_quantized
from effc.runtime.timing import DECISION_ROTATE_BYTES, copies_for, interleaved_medians

ACTIVATIONS = ("fp32", "int8")


def check_activations(activations: str, bits: int) -> bool:
    """Whether a layer of ``bits``-bit weights runs the int8-activation kernel under
    ``activations``; a clear error where that mode is unknown."""
    if activations not in ACTIVATIONS:
        raise UnsupportedError(
            f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}"
        )
    return activations == "int8" and bits == 4  # int8 weights keep fp32 activations


def bsr_matmul(x2: torch.Tensor, matrix_arrays, out_features: int, group: int, bits: int, a8: bool):
    """The kernel call behind every BSR layer: x2 (M, K) float32 contiguous. With ``a8`` (int4
    weights, int8-activation mode), rows of x are quantized to int8 per block of ``group`` and
    multiplied with integer dot products (AVX512-VNNI where the CPU has it, else AVX2; at M = 1
    too: its GEMV runs lanes over K)."""
    if a8:
        return kernels().bsr_linear_a8(x2, *matrix_arrays, out_features, group)
    return kernels().bsr_linear(x2, *matrix_arrays, out_features, group, bits)


class BSRLinear(nn.Module):
    """y = x W^T + b with W stored as BSR (1 x g int4/int8 blocks). ``activations="int8"``
    (opt-in, lossy) quantizes x to int8 per block for int4 layers (see ``bsr_matmul``)."""

    def __init__(
        self, matrix: BSRMatrix, bias: torch.Tensor | None = None, activations: str = "fp32"
    ):
        super().__init__()
        matrix.validate()
        self.out_features, self.in_features = matrix.shape
        self.group, self.bits = matrix.group, matrix.bits
        self.activations = activations
        self.a8 = check_activations(activations, matrix.bits)
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
        # written for per-call overhead (HF generate() calls 211 of these a token): buffers come
        # from the buffer dict, not nn.Module.__getattr__, and a contiguous fp32 x is only viewed
        b = self._buffers
        if x.dtype == torch.float32 and x.is_contiguous():
            x2 = x.view(-1, self.in_features)
        else:
            x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        arrays = (b["indptr"], b["indices"], b["values"], b["scales"], b["zeros"])
        y = bsr_matmul(x2, arrays, self.out_features, self.group, self.bits, self.a8)
        bias = self._parameters.get("bias")
        if bias is not None:
            y += bias
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        m = self.matrix
        return (
            f"in={self.in_features}, out={self.out_features}, group={self.group}, bits={self.bits}, "
            f"density={m.density:.3f}, activations={self.activations}"
        )


def matrix_from_state(state: SiteState) -> BSRMatrix:
    """Pack a site's quantization (and pruning mask, if any) into BSR."""
    return from_quantized(state.codes, state.scale, state.zero, state.group_mask(), state.bits)


# a layer stays dense only where dense is faster by more than 5% and by more than 2 us per call
# (below that, call overhead and timer noise decide: a tie, which goes to the smaller form)
MARGIN, TIE_MS = 0.05, 0.002


def choose(sparse_ms: float, dense_ms: float, margin: float = MARGIN) -> str:
    faster = dense_ms * (1 + margin) < sparse_ms and sparse_ms - dense_ms > TIE_MS
    return "dense" if faster else "sparse"


@torch.no_grad()
def measure_choice(matrix: BSRMatrix, batch: int, activations: str = "fp32") -> dict:
    """Time the BSR kernel against dense fp32 ``F.linear`` of the same shape at ``batch`` rows, as
    the layer runs in a model: each call reads another copy of the weights, from a rotation of
    twice the L3 (``effc.runtime.timing``); interleaved medians of 9 trials. The layer goes sparse
    unless dense is faster by more than 5% (``choose``)."""
    out, inp = matrix.shape
    x = torch.randn(batch, inp)
    a8 = check_activations(activations, matrix.bits)
    arrays = (matrix.indptr, matrix.indices, matrix.values, matrix.scales, matrix.zeros)
    n = copies_for(out * inp * 4, DECISION_ROTATE_BYTES)
    dense = [torch.randn(out, inp) for _ in range(n)]
    sparse = [tuple(a.clone() for a in arrays) for _ in range(n)]

    def run_sparse():
        for a in sparse:
            bsr_matmul(x, a, out, matrix.group, matrix.bits, a8)

    def run_dense():
        for w in dense:
            torch.nn.functional.linear(x, w)

    sparse_ms, dense_ms = (t / n for t in interleaved_medians([run_sparse, run_dense]))
    return {
        "sparse_ms": round(sparse_ms, 5),
        "dense_ms": round(dense_ms, 5),
        "rotation": n,
        "choice": choose(sparse_ms, dense_ms),
    }


@torch.no_grad()
def swap_linears(
    module: nn.Module,
    compression: CompressionState,
    batch: int = 1,
    decide: bool = True,
    activations: str = "fp32",
) -> list[dict]:
    """Replace every quantized ``nn.Linear`` of ``module`` by a ``BSRLinear``; return one record per
    layer. Layers sharing one weight Parameter (``share-blocks``) share one packed copy of it:
    one ``BSRLinear`` for all of them where they share the bias too (or have none), else one per
    bias over the same packed arrays (share-blocks keeps biases per block). With ``decide``, a
    layer whose BSR kernel is slower than dense ``F.linear`` at ``batch``
    rows stays dense (its fake-quantized fp32 weight), and the record says so with both timings.
    ``activations`` picks the kernel's activation mode (``BSRLinear``)."""
    records = []
    for fqn, state in compression.quantized().items():
        if state.bits not in (4, 8):
            continue
        linear = module.get_submodule(fqn)
        if not isinstance(linear, nn.Linear):
            continue
        bsr = BSRLinear(matrix_from_state(state), linear.bias, activations)
        record = {
            "layer": fqn,
            "shape": [bsr.out_features, bsr.in_features],
            "density": bsr.matrix.density,
            "bytes": bsr.matrix.nbytes(),
            "dense_bytes": linear.weight.numel() * 4,
            "activations": "int8" if bsr.a8 else "fp32",
        }
        record.update(
            measure_choice(bsr.matrix, batch, activations) if decide else {"choice": "sparse"}
        )
        if record["choice"] == "sparse":
            # every layer reading this weight (blocks sharing parameters) reads the same packed
            # arrays: one copy in memory; a layer with a bias of its own gets its own module
            readers = [(n, m) for n, m in module.named_modules() if _reads(m, linear.weight)]
            made = {id(linear.bias): bsr}
            for name, m in readers:
                if id(m.bias) not in made:
                    made[id(m.bias)] = BSRLinear(bsr.matrix, m.bias, activations)
                parent, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, leaf, made[id(m.bias)])
            readers = [n for n, _ in readers]
            if len(readers) > 1:
                record["shared_by"] = readers
        records.append(record)
    return records


def _reads(module: nn.Module, weight: torch.Tensor) -> bool:
    return isinstance(module, nn.Linear) and module.weight is weight
