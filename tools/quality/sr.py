"""Super-resolution quality on held-out skimage.data images: PSNR of a model against bicubic.

Evaluation images (never trained on): chelsea and rocket. HR = the image cropped to a multiple of
16 pixels; LR = its antialiased bicubic x2 downscale; PSNR in RGB on [0, 1], ``scale`` border
pixels shaved, as SR papers do.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from effc.errors import UnsupportedError

EVAL_IMAGES = ("chelsea", "rocket")


def load_image(name: str) -> torch.Tensor:
    """(3, H, W) float in [0, 1]; greyscale images repeated to 3 channels."""
    try:
        import skimage.data
    except ImportError as e:
        raise UnsupportedError("the images need scikit-image: pip install 'effc[vision]'") from e
    img = torch.from_numpy(getattr(skimage.data, name)()).float() / 255.0
    if img.dim() == 2:
        img = img[None].expand(3, -1, -1)
    else:
        img = img[..., :3].permute(2, 0, 1)
    return img.contiguous()


def downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(
        hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False
    ).clamp(0, 1)


def upscale_bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor, shave: int) -> float:
    if shave:
        a, b = a[..., shave:-shave, shave:-shave], b[..., shave:-shave, shave:-shave]
    mse = float(((a.clamp(0, 1) - b) ** 2).mean())
    return 10 * math.log10(1.0 / mse)


def eval_pairs(scale: int, multiple: int = 16) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (LR (1, 3, h, w), HR (1, 3, s*h, s*w))} for the evaluation images."""
    out = {}
    for name in EVAL_IMAGES:
        img = load_image(name)
        h, w = (d // multiple * multiple for d in img.shape[1:])
        hr = img[None, :, :h, :w]
        out[name] = (downscale(hr, scale), hr)
    return out


@torch.no_grad()
def evaluate(model, scale: int) -> dict:
    """PSNR (dB) per evaluation image and their mean, for bicubic and for ``model``."""
    result: dict = {"bicubic": {}, "model": {}}
    for name, (lr, hr) in eval_pairs(scale).items():
        result["bicubic"][name] = psnr(upscale_bicubic(lr, scale), hr, scale)
        result["model"][name] = psnr(model(lr), hr, scale)
    for key in ("bicubic", "model"):
        result[key]["mean"] = sum(result[key].values()) / len(EVAL_IMAGES)
    return result
