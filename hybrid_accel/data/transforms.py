"""Joint image/mask transforms: resize, random scale/rotation/crop, flips, colour jitter, normalise.

The geometric part is one affine warp per sample (PIL, bilinear for the image, nearest for the
mask), composed from the resize to the output size and the random zoom, rotation and
translation, so an image is resampled once whatever the augmentation. Pixels warped in from
outside the source are black in the image and the ignore value in the mask, so they never count
in the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass
class AugmentConfig:
    """Ranges of the random augmentation (each one-line: what it does)."""

    scale: tuple[float, float] = (0.75, 1.25)  # zoom factor; > 1 zooms in (a random crop)
    rotate: float = 15.0  # maximum rotation, degrees either way
    translate: float = 0.1  # maximum shift, fraction of the output size
    hflip: float = 0.5  # probability of a horizontal flip
    vflip: float = 0.5  # probability of a vertical flip (endoscopy and OCT have no fixed up)
    brightness: float = 0.2  # brightness factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2  # contrast factor drawn from [1 - c, 1 + c]
    saturation: float = 0.2  # saturation factor drawn from [1 - s, 1 + s]


def warp_pair(
    image: np.ndarray,
    mask: np.ndarray,
    out_size: tuple[int, int],
    zoom: float = 1.0,
    angle: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    ignore_index: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """Resize ``image`` [H, W, 3] uint8 and ``mask`` [H, W] to ``out_size`` (H, W) with an
    optional zoom about the centre, rotation (degrees) and shift (output pixels, dy, dx)."""
    h0, w0 = mask.shape
    h, w = out_size
    im = Image.fromarray(image)
    mk = Image.fromarray(mask.astype(np.uint8), mode="L")
    if zoom == 1.0 and angle == 0.0 and shift == (0.0, 0.0):
        if (h, w) == (h0, w0):
            return image, mask
        return (np.asarray(im.resize((w, h), Image.BILINEAR)), np.asarray(mk.resize((w, h), Image.NEAREST)))
    # Output pixel (x, y) samples the source at c_in + M (p - c_out - shift), in PIL's
    # continuous coordinates (pixel centres at +0.5), so identity parameters give a plain resize.
    sx, sy = w0 / w / zoom, h0 / h / zoom
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    a, b = c * sx, -s * sx
    d, e = s * sy, c * sy
    ox, oy = w / 2 + shift[1], h / 2 + shift[0]
    coeffs = (a, b, w0 / 2 - a * ox - b * oy, d, e, h0 / 2 - d * ox - e * oy)
    img = im.transform((w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    msk = mk.transform((w, h), Image.AFFINE, coeffs, resample=Image.NEAREST, fillcolor=ignore_index)
    return np.asarray(img), np.asarray(msk)


def color_jitter(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Brightness, contrast and saturation jitter on a float [H, W, 3] image in [0, 1]."""
    bf = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    cf = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    sf = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    lum = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = img * np.float32(bf)
    mean = np.float32((img @ lum).mean())
    img = (img - mean) * np.float32(cf) + mean
    grey = (img @ lum)[..., None]
    img = (img - grey) * np.float32(sf) + grey
    return np.clip(img, 0.0, 1.0)


def to_tensors(image: np.ndarray, mask: np.ndarray, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 or [0,1]-float image [H, W, 3] -> ImageNet-normalised float32 [3, H, W]; mask -> int64."""
    img = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    img = (img - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), torch.from_numpy(mask.astype(np.int64))


def transform_pair(
    image: np.ndarray,
    mask: np.ndarray,
    out_size: tuple[int, int] | None,
    rng: np.random.Generator | None = None,
    cfg: AugmentConfig | None = None,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to ``out_size`` (None: keep), augment when ``rng`` is given, normalise."""
    out_size = tuple(mask.shape) if out_size is None else out_size
    if rng is None:
        image, mask = warp_pair(image, mask, out_size, ignore_index=ignore_index)
        return to_tensors(image, mask, ignore_index)
    cfg = cfg or AugmentConfig()
    zoom = math.exp(rng.uniform(math.log(cfg.scale[0]), math.log(cfg.scale[1])))
    angle = rng.uniform(-cfg.rotate, cfg.rotate)
    shift = tuple(rng.uniform(-cfg.translate, cfg.translate) * n for n in out_size)
    image, mask = warp_pair(image, mask, out_size, zoom, angle, shift, ignore_index)
    if rng.random() < cfg.hflip:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < cfg.vflip:
        image, mask = image[::-1], mask[::-1]
    img = color_jitter(image.astype(np.float32) / 255.0, rng, cfg)
    return to_tensors(img, mask, ignore_index)
