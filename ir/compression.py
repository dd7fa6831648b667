"""Compression state: what lossy passes decided about a model, as typed records.

Every pass that compresses weights writes here (group-prune, nm-prune, quantize, gqsa-train,
rearrange) and every consumer reads from here (bsr-pack, tensorrt-legalize, the onnxruntime
target's weight codes, the runtime's ``swap_linears``), instead of a free-form dict. A model
(``FxModel`` / ``OnnxModel``) carries one ``CompressionState`` as ``model.compression``; it
survives the FX -> ONNX lowering (sites keep their FQN) and saves to safetensors plus a JSON
header, validated on load like every other file effc reads.

Per weight site (FQN; the weight viewed as (out, in), groups along the input dimension):

    original      float (out, in)       the weight before the first lossy pass (training's teacher)
    group         int                   g of the 1 x g groups of ``mask`` and of quantization
    mask          bool (out, in/g)      kept groups (group-prune)
    element_mask  bool (out, in)        kept weights (nm-prune's N:M); for a convolution
                                        (kernel-sparsity) the weight's own (out, in/groups, k...)
    bits          int                   2, 3, 4 or 8
    codes         uint8 (out, in/g, g)  W ~= scale * (codes - zero), pruned groups at their zero
    scale         float32 (out, in/g)   fp16-exact
    zero          uint8 (out, in/g)
    block         (rows, cols)          the storage block shape (BSR); default (1, g); for
                                        kernel-sparsity the block over the (out, in/groups * k)
                                        matrix view
    pattern       str                   kernel-sparsity's pattern name ("4x1", "kernel", ...)
    permutation   int64 (in,)           the input-channel order a rearrangement applied

Per block (transformer layer FQN), for block-level passes: ``gate`` (a learned importance),
``removed``, ``shares_with`` (the FQN of the block whose weights it uses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from effc.errors import InputError

FORMAT = "effc-compression"
VERSION = 1
_TENSORS = ("original", "mask", "element_mask", "codes", "scale", "zero", "permutation")
_SCALARS = ("group", "bits", "block", "pattern")


@dataclass
class SiteState:
    """What lossy passes recorded about one weight site (see the module docstring)."""

    original: torch.Tensor | None = None
    group: int | None = None
    mask: torch.Tensor | None = None
    element_mask: torch.Tensor | None = None
    bits: int | None = None
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    block: tuple[int, int] | None = None
    pattern: str | None = None
    permutation: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    @property
    def pruned(self) -> bool:
        return self.mask is not None or self.element_mask is not None

    @property
    def compressed(self) -> bool:
        """The weight sits on a quantization grid or a sparsity pattern: never refold it."""
        return self.quantized or self.pruned

    def keep_mask(self) -> torch.Tensor | None:
        """Kept weights (out, in) as a bool mask, from the element or the group mask."""
        if self.element_mask is not None:
            return self.element_mask
        if self.mask is not None:
            return self.mask.repeat_interleave(self.group, dim=1)
        return None

    def group_mask(self) -> torch.Tensor:
        """Kept groups (out, in/g); every group where nothing was pruned."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.scale.shape, dtype=torch.bool)

    def dequantized(self) -> torch.Tensor:
        """scale * (codes - zero), pruned groups zero, as (out, in)."""
        w = self.scale[..., None] * (self.codes.float() - self.zero.float()[..., None])
        if self.mask is not None:
            w = w * self.mask[..., None]
        return w.reshape(w.shape[0], -1)

    def validate(self, fqn: str) -> None:
        """Raise InputError unless every field is consistent with the others."""

        def bad(msg: str):
            raise InputError(f"compression state of {fqn}: {msg}")

        if self.group is not None and (not isinstance(self.group, int) or self.group < 1):
            bad(f"group must be a positive integer, got {self.group!r}")
        if self.mask is not None:
            if self.group is None or self.mask.dtype != torch.bool or self.mask.dim() != 2:
                bad("mask must be a 2-D bool tensor with a group")
        if self.element_mask is not None and self.element_mask.dtype != torch.bool:
            bad("element_mask must be bool")
        if self.codes is None:
            if any(v is not None for v in (self.scale, self.zero, self.bits)):
                bad("scale, zero and bits come with codes")
            return
        if self.bits not in (2, 3, 4, 8) or self.group is None:
            bad(f"bits must be 2, 3, 4 or 8 with a group, got {self.bits!r}")
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 3:
            bad(
                f"codes must be uint8 (out, in/g, g), got {self.codes.dtype} {tuple(self.codes.shape)}"
            )
        out, ngroups, g = self.codes.shape
        if g != self.group:
            bad(f"codes hold groups of {g}, the group is {self.group}")
        for name in ("scale", "zero") + (("mask",) if self.mask is not None else ()):
            t = getattr(self, name)
            if t is None or tuple(t.shape) != (out, ngroups):
                bad(f"{name} must have shape {(out, ngroups)}")
        if self.zero.dtype != torch.uint8:
            bad("zero must be uint8")
        top = 2**self.bits - 1
        if self.codes.numel() and max(int(self.codes.max()), int(self.zero.max())) > top:
            bad(f"a code or zero point exceeds {top} ({self.bits} bits)")
        if not bool(torch.isfinite(self.scale).all()) or bool((self.scale <= 0).any()):
            bad("every scale must be finite and positive")
        if self.original is not None and tuple(self.original.shape) != (out, ngroups * g):
            bad(f"original must have shape {(out, ngroups * g)}")


@dataclass
class BlockState:
    """Block-level decisions (FoldGPT): importance gate, removal, weight sharing."""

    gate: float | None = None
    removed: bool = False
    shares_with: str | None = None


@dataclass
class CompressionState:
    """The compression records of one model, by weight-site and block FQN."""

    sites: dict[str, SiteState] = field(default_factory=dict)
    blocks: dict[str, BlockState] = field(default_factory=dict)

    def site(self, fqn: str) -> SiteState:
        """The record of ``fqn``, created empty when there is none."""
        return self.sites.setdefault(fqn, SiteState())

    def get(self, fqn: str) -> SiteState | None:
        return self.sites.get(fqn)

    def block(self, fqn: str) -> BlockState:
        """The block record of ``fqn``, created empty when there is none."""
        return self.blocks.setdefault(fqn, BlockState())

    def quantized(self) -> dict[str, SiteState]:
        return {k: s for k, s in self.sites.items() if s.quantized}

    def is_quantized(self, fqn: str, bits=(2, 3, 4, 8)) -> bool:
        s = self.sites.get(fqn)
        return s is not None and s.quantized and s.bits in bits

    def is_compressed(self, fqn: str) -> bool:
        s = self.sites.get(fqn)
        return s is not None and s.compressed

    def __bool__(self) -> bool:
        return bool(self.sites or self.blocks)

    def validate(self) -> None:
        for fqn, s in self.sites.items():
            s.validate(fqn)

    def save(self, path: str | Path) -> None:
        """Tensors into safetensors (``FQN/field``), the rest into its JSON header."""
        tensors, header = {}, {}
        for fqn, s in self.sites.items():
            header[fqn] = {k: getattr(s, k) for k in _SCALARS if getattr(s, k) is not None}
            for k in _TENSORS:
                t = getattr(s, k)
                if t is not None:
                    tensors[f"{fqn}/{k}"] = t.detach().contiguous()
        blocks = {k: vars(b) for k, b in self.blocks.items()}
        meta = {
            "format": FORMAT,
            "version": str(VERSION),
            "sites": json.dumps(header),
            "blocks": json.dumps(blocks),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> CompressionState:
        """Read and validate a file written by ``save``."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
                raise InputError(f"{path} is not an {FORMAT} v{VERSION} file")
            header, blocks = json.loads(meta["sites"]), json.loads(meta["blocks"])
            state = cls(blocks={k: BlockState(**v) for k, v in blocks.items()})
            names = {f.name for f in fields(SiteState)}
            for fqn, scalars in header.items():
                if not set(scalars) <= names:
                    raise InputError(f"{path}: unknown fields {sorted(set(scalars) - names)}")
                s = state.site(fqn)
                for k, v in scalars.items():
                    setattr(s, k, tuple(v) if k == "block" else v)
            for key, t in tensors.items():
                fqn, _, k = key.rpartition("/")
                if k not in _TENSORS or fqn not in header:
                    raise InputError(f"{path}: unexpected tensor {key!r}")
                setattr(state.sites[fqn], k, t)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path} is not a readable compression state ({e})") from e
        state.validate()
        return state
