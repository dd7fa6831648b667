"""A DITN-style super-resolution network (Liu et al., "Unfolding Once is Enough: A
Deployment-Friendly Transformer Unit for Super-Resolution", ACM MM 2023), built in code.

Structure: a 3x3 conv stem; UFONE units, each = one unfold into p x p patches, inner-patch
transformer layers (ITL: channel attention inside each patch, then a gated depthwise FFN), one
fold, then spatial-aware layers (SAL: 5x5 depthwise -> 7x7 depthwise with dilation 3 -> 1x1,
gating the input, then a gated depthwise FFN); a 3x3 conv; a conv + pixel-shuffle upsampler,
with a global residual from the stem.

Normalization slots (``norm``): ``"layernorm"`` is the channel LayerNorm of Restormer-style code
on NCHW (to_3d: b c h w -> b (h w) c, LayerNorm over c, to_4d back); ``"tanh"`` is the
deployment form (tanh then a 1x1 conv). ``unfold="per-layer"`` writes the partition/reverse
pair around every ITL instead of once per unit (what naive code does; same math);
``unfold="per-op"`` partitions and reverses around every attention and FFN with the residual
adds on the image (Swin-style code). Both are inputs of the ``fuse`` rules that hoist them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from effc.models.weights import WEIGHTS_DIR, load_weights


@dataclass
class DITNConfig:
    dim: int = 32
    units: int = 1
    itl_blocks: int = 2
    sal_blocks: int = 1
    heads: int = 2
    ffn_expansion: float = 2.0
    patch: int = 8
    scale: int = 2
    norm: str = "layernorm"  # or "tanh"
    unfold: str = "once"  # or "per-layer", "per-op"


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels of an NCHW tensor, through (b, h*w, c) as Restormer writes it."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x.flatten(2).transpose(1, 2))  # to_3d
        return y.transpose(1, 2).reshape(b, c, h, w)  # to_4d


class TanhNorm(nn.Module):
    """The deployment-friendly substitute: tanh, then a learnable 1x1 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(x))


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return ChannelLayerNorm(dim)
    if kind == "tanh":
        return TanhNorm(dim)
    raise ValueError(f"norm must be 'layernorm' or 'tanh', not {kind!r}")


class ChannelAttention(nn.Module):
    """Attention across channels inside each patch (Restormer's MDTA on a p x p patch)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1)
        self.qkv_dw = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3)
        self.project = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dw(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project((attn @ v).reshape(b, c, h, w))


class GatedDWFFN(nn.Module):
    """Gated depthwise feed-forward: 1x1 up to 2 branches, 3x3 depthwise, GELU gate, 1x1 down."""

    def __init__(self, dim: int, expansion: float):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2)
        self.project_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(a) * g)


def partition(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * H/p * W/p, C, p, p): the patches, batched."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c, p, p)


def reverse(x: torch.Tensor, p: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``partition``."""
    c = x.shape[1]
    x = x.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


class ITL(nn.Module):
    """Inner-patch transformer layer, on batched patches."""

    def __init__(self, cfg: DITNConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.dim)
        self.attn = ChannelAttention(cfg.dim, cfg.heads)
        self.norm2 = make_norm(cfg.norm, cfg.dim)
        self.ffn = GatedDWFFN(cfg.dim, cfg.ffn_expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class SAL(nn.Module):
    """Spatial-aware layer: large-kernel depthwise gating, then a gated depthwise FFN."""

    def __init__(self, cfg: DITNConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = make_norm(cfg.norm, d)
        self.dw5 = nn.Conv2d(d, d, 5, padding=2, groups=d)
        self.dw7 = nn.Conv2d(d, d, 7, padding=9, groups=d, dilation=3)
        self.pw = nn.Conv2d(d, d, 1)
        self.norm2 = make_norm(cfg.norm, d)
        self.ffn = GatedDWFFN(d, cfg.ffn_expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm1(x)
        x = x + u * self.pw(self.dw7(self.dw5(u)))
        return x + self.ffn(self.norm2(x))


class UFONE(nn.Module):
    """Unfold once, run the ITLs on the patches, fold once, then the SALs on the image."""

    def __init__(self, cfg: DITNConfig):
        super().__init__()
        self.patch, self.unfold = cfg.patch, cfg.unfold
        if cfg.unfold not in ("once", "per-layer", "per-op"):
            raise ValueError(f"unfold must be 'once', 'per-layer' or 'per-op', not {cfg.unfold!r}")
        self.itls = nn.ModuleList(ITL(cfg) for _ in range(cfg.itl_blocks))
        self.sals = nn.Sequential(*(SAL(cfg) for _ in range(cfg.sal_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch
        if self.unfold == "per-layer":
            for itl in self.itls:
                x = reverse(itl(partition(x, p)), p, b, h, w)
        elif self.unfold == "per-op":  # Swin-style: residuals on the image, patches per op
            for itl in self.itls:
                x = x + reverse(itl.attn(itl.norm1(partition(x, p))), p, b, h, w)
                x = x + reverse(itl.ffn(itl.norm2(partition(x, p))), p, b, h, w)
        else:
            y = partition(x, p)
            for itl in self.itls:
                y = itl(y)
            x = reverse(y, p, b, h, w)
        return self.sals(x)


class DITN(nn.Module):
    """Super-resolution: (B, 3, H, W) in [0, 1] -> (B, 3, s*H, s*W); H and W multiples of the
    patch size."""

    def __init__(self, cfg: DITNConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or DITNConfig()
        self.stem = nn.Conv2d(3, cfg.dim, 3, padding=1)
        self.units = nn.Sequential(*(UFONE(cfg) for _ in range(cfg.units)))
        self.body_conv = nn.Conv2d(cfg.dim, cfg.dim, 3, padding=1)
        self.upsample = nn.Sequential(
            nn.Conv2d(cfg.dim, 3 * cfg.scale**2, 3, padding=1), nn.PixelShuffle(cfg.scale)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.stem(x)
        return self.upsample(self.body_conv(self.units(feat)) + feat)

    def example_inputs(self, batch: int = 1, size: int = 32) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {"x": torch.rand(batch, 3, size, size, generator=g)}


TRAINED = "ditn_x2.safetensors"


def load_trained(**overrides) -> DITN:
    """The x2 model trained by ``tools/train/ditn.py`` (weights ship with effc). ``overrides``
    change structure-only settings that keep the same weights (``unfold``)."""
    import json

    path = WEIGHTS_DIR / TRAINED
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: python -m tools.train.ditn")
    state, meta = load_weights(path)
    cfg = DITNConfig(**{**json.loads(meta["config"]), **overrides})
    model = DITN(cfg)
    model.load_state_dict(state)
    return model.eval()
