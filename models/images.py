"""Real photographs for vision calibration and evaluation, offline: scikit-image's bundled images
(shared DATA.md), cut into seeded random crops and normalised for ImageNet models.

There are no labelled ImageNet images here, so a compressed classifier is judged by its agreement
with the original (top-1/top-5, KL) on many crops. Calibration and evaluation never share an
image: ``CALIBRATION`` images calibrate and train (recovery), ``EVALUATION`` images measure.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from effc.errors import UnsupportedError
from effc.models.mobilenet import IMAGENET_MEAN, IMAGENET_STD

CALIBRATION = ("coffee", "immunohistochemistry", "brick", "gravel", "retina")
EVALUATION = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "colorwheel")
EVALUATION += ("stereo_motorcycle", "camera", "grass", "page")


def load_image(name: str) -> torch.Tensor:
    """One bundled image as float (3, H, W) in [0, 1] (grey images repeated to RGB)."""
    try:
        import skimage.data as data
    except ImportError as e:
        raise UnsupportedError(
            "the bundled images need scikit-image: pip install 'effc[vision]'"
        ) from e
    img = getattr(data, name)()
    if isinstance(img, tuple):  # stereo pairs
        img = img[0]
    img = np.asarray(img, dtype=np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(img[:, :, :3].transpose(2, 0, 1)))


def random_crops(
    names: tuple[str, ...], count: int, size: int = 224, seed: int = 0, normalize: bool = True
) -> np.ndarray:
    """``count`` crops (count, 3, size, size) float32: images taken in turn, each crop a random
    area (10-100% of the image) and aspect ratio (3/4-4/3), flipped at random, resized
    (bilinear, antialiased), brightness jittered by up to 20%, then ImageNet-normalised."""
    g = torch.Generator().manual_seed(seed)
    images = [load_image(n) for n in names]
    out = np.empty((count, 3, size, size), np.float32)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    for i in range(count):
        img = images[i % len(images)]
        _, h, w = img.shape
        area = uniform(0.1, 1.0) * h * w
        ratio = math.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
        ch = min(h, max(8, round(math.sqrt(area / ratio))))
        cw = min(w, max(8, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, h - ch + 1, (), generator=g))
        left = int(torch.randint(0, w - cw + 1, (), generator=g))
        crop = img[:, top : top + ch, left : left + cw][None]
        crop = F.interpolate(crop, (size, size), mode="bilinear", antialias=True)[0]
        if float(torch.rand((), generator=g)) < 0.5:
            crop = crop.flip(-1)
        crop = (crop * uniform(0.8, 1.2)).clamp(0, 1)
        out[i] = ((crop - mean) / std if normalize else crop).numpy()
    return out


def calibration_crops(count: int, size: int = 224, seed: int = 0) -> np.ndarray:
    return random_crops(CALIBRATION, count, size, seed)


def evaluation_crops(count: int, size: int = 224, seed: int = 1) -> np.ndarray:
    return random_crops(EVALUATION, count, size, seed)
