"""Block Sparse Row storage for group-sparse, group-quantized weights (DESIGN.md section 5).

A weight W (out x in) is cut into 1 x g blocks along the input dimension (g = the quantization
group). Kept blocks are stored row by row:

    indptr  int32  [out + 1]        blocks of row r are indptr[r]:indptr[r+1]
    indices uint16 [nnzb]           block column (input offset = index * g)
    values  uint8  [nnzb * g*bits/8]  codes; int4: 8 bytes per 16 codes, byte k = code k | code k+8 << 4
    scales  fp16   [nnzb]
    zeros   uint8  [nnzb]           W[r, c*g + j] = scale * (code_j - zero)

Metadata is a real share of the bytes at g = 16 (int4: 8 bytes of codes + 2 index + 2 scale + 1
zero per block), so ``nbytes()`` splits values / indices / scales. Files are safetensors with the
shape, group and bits in the header metadata; ``validate()`` checks every shape, bound and
monotonic ``indptr`` before any kernel reads the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from effc.errors import InputError

FORMAT = "effc-bsr"
VERSION = 1


@dataclass
class BSRMatrix:
    shape: tuple[int, int]
    group: int
    bits: int
    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    @property
    def nnzb(self) -> int:
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        return self.nnzb * self.group / max(1, self.shape[0] * self.shape[1])

    def nbytes(self) -> dict[str, int]:
        return {
            "values": self.values.numel(),
            "indices": self.indices.numel() * 2 + self.indptr.numel() * 4,
            "scales": self.scales.numel() * 2 + self.zeros.numel(),
        }

    def validate(self) -> None:
        """Raise InputError unless every array is consistent (run before kernels touch data)."""
        out, inp = self.shape
        g, bits = self.group, self.bits

        def bad(msg):
            raise InputError(f"invalid BSR matrix {out}x{inp} (group {g}, {bits} bits): {msg}")

        if bits not in (4, 8):
            bad("bits must be 4 or 8")
        if g <= 0 or g % (16 if bits == 4 else 8) or inp % g:
            bad("the group must divide the input size and be a multiple of 16 (int4) or 8 (int8)")
        if inp // g > 65536:
            bad("too many block columns for uint16 indices")
        expect = {
            "indptr": (self.indptr, torch.int32, (out + 1,)),
            "indices": (self.indices, torch.uint16, None),
            "values": (self.values, torch.uint8, (self.nnzb * g * bits // 8,)),
            "scales": (self.scales, torch.float16, (self.nnzb,)),
            "zeros": (self.zeros, torch.uint8, (self.nnzb,)),
        }
        for name, (t, dtype, shape) in expect.items():
            if t.dtype != dtype or t.dim() != 1 or (shape and tuple(t.shape) != shape):
                bad(
                    f"{name} must be {dtype} of shape {shape or '(nnzb,)'}, got {t.dtype} {tuple(t.shape)}"
                )
            if not t.is_contiguous():
                bad(f"{name} is not contiguous")
        ptr = self.indptr.to(torch.int64)
        if ptr[0] != 0 or ptr[-1] != self.nnzb or bool((ptr[1:] < ptr[:-1]).any()):
            bad("indptr must start at 0, end at nnzb and never decrease")
        idx = self.indices.to(torch.int64)
        if self.nnzb and int(idx.max()) >= inp // g:
            bad("a block index is out of range")
        if self.nnzb > 1:  # block columns strictly ascend within each row (kernels rely on it)
            starts = torch.zeros(self.nnzb, dtype=torch.bool)
            starts[ptr[:-1][ptr[:-1] < self.nnzb]] = True
            if bool(((idx[1:] <= idx[:-1]) & ~starts[1:]).any()):
                bad("block indices must ascend within each row")

        if bits == 4 and self.nnzb and int(self.zeros.max()) > 15:
            bad("an int4 zero point exceeds 15")
        if not bool(torch.isfinite(self.scales.float()).all()):
            bad("a scale is not finite")

    def to_dense(self) -> torch.Tensor:
        """The dequantized dense weight. For tests and references only; kernels never call it."""
        out, inp = self.shape
        g = self.group
        codes = unpack_codes(self.values, self.bits).view(self.nnzb, g).float()
        blocks = (codes - self.zeros.float()[:, None]) * self.scales.float()[:, None]
        dense = torch.zeros(out, inp // g, g)
        rows = torch.repeat_interleave(
            torch.arange(out), (self.indptr[1:] - self.indptr[:-1]).long()
        )
        dense[rows, self.indices.long()] = blocks
        return dense.view(out, inp)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("indptr", "indices", "values", "scales", "zeros")}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (uint8 values < 2**bits) -> bytes. int4: every 16 codes take 8 bytes, byte k holding
    code k in its low nibble and code k + 8 in its high nibble (one shift unpacks 8 of them)."""
    codes = codes.to(torch.uint8).reshape(-1)
    if bits == 8:
        return codes.contiguous()
    pairs = codes.view(-1, 2, 8)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).reshape(-1).contiguous()


def unpack_codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return values
    chunks = values.view(-1, 8)
    return torch.stack((chunks & 0xF, chunks >> 4), dim=1).reshape(-1)


def from_quantized(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, mask: torch.Tensor, bits: int
) -> BSRMatrix:
    """Pack per-group codes (out, in/g, g), scales and zeros (out, in/g) and the kept-group mask
    (out, in/g) into BSR."""
    out, ngroups, g = codes.shape
    counts = mask.sum(dim=1).to(torch.int32)
    indptr = torch.zeros(out + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(counts, 0)
    rows, cols = mask.nonzero(as_tuple=True)
    matrix = BSRMatrix(
        (out, ngroups * g),
        g,
        bits,
        indptr,
        cols.to(torch.uint16).contiguous(),
        pack_codes(codes[rows, cols], bits),
        scales[rows, cols].to(torch.float16).contiguous(),
        zeros[rows, cols].to(torch.uint8).contiguous(),
    )
    matrix.validate()
    return matrix


def save(matrices: dict[str, BSRMatrix], path: str | Path) -> None:
    """Write named BSR matrices to one safetensors file."""
    from safetensors.torch import save_file

    tensors, meta = {}, {"format": FORMAT, "version": str(VERSION)}
    for name, m in matrices.items():
        for key, t in m.tensors().items():
            tensors[f"{name}.{key}"] = t
        meta[f"{name}.shape"] = f"{m.shape[0]}x{m.shape[1]}"
        meta[f"{name}.group"] = str(m.group)
        meta[f"{name}.bits"] = str(m.bits)
    save_file(tensors, str(path), metadata=meta)


def load(path: str | Path) -> dict[str, BSRMatrix]:
    """Read and validate every matrix in a file written by ``save``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable BSR file ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise InputError(f"{path} is not an {FORMAT} v{VERSION} file")
    out = {}
    try:
        for key in sorted(k[: -len(".shape")] for k in meta if k.endswith(".shape")):
            rows, cols = (int(v) for v in meta[f"{key}.shape"].split("x"))
            parts = {
                p: tensors[f"{key}.{p}"] for p in ("indptr", "indices", "values", "scales", "zeros")
            }
            m = BSRMatrix(
                (rows, cols), int(meta[f"{key}.group"]), int(meta[f"{key}.bits"]), **parts
            )
            m.validate()
            out[key] = m
    except (KeyError, ValueError) as e:
        raise InputError(f"{path}: inconsistent BSR file ({e})") from e
    return out


def concat_rows(matrices: list[BSRMatrix]) -> BSRMatrix:
    """One matrix whose rows are those of ``matrices`` in order (one input width, group and bits):
    y = x Wᵀ of the result is the concatenation of each matrix's y, so projections that read one
    input (q/k/v, gate/up) run as one kernel call."""
    first = matrices[0]
    for m in matrices[1:]:
        if (m.shape[1], m.group, m.bits) != (first.shape[1], first.group, first.bits):
            raise InputError(
                f"cannot stack BSR matrices of input width/group/bits {m.shape[1]}/{m.group}/"
                f"{m.bits} and {first.shape[1]}/{first.group}/{first.bits}"
            )
    pointers, offset = [first.indptr[:1]], 0
    for m in matrices:
        pointers.append(m.indptr[1:] + offset)
        offset += m.nnzb
    return BSRMatrix(
        (sum(m.shape[0] for m in matrices), first.shape[1]),
        first.group,
        first.bits,
        torch.cat(pointers).to(torch.int32),
        *(
            torch.cat([getattr(m, k) for m in matrices])
            for k in ("indices", "values", "scales", "zeros")
        ),
    )
