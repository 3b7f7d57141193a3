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
    hflip: bool = False,
    vflip: bool = False,
    ignore_index: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """Resize ``image`` [H, W, 3] uint8 and ``mask`` [H, W] to ``out_size`` (H, W) with an
    optional zoom about the centre, rotation (degrees), shift (output pixels, dy, dx) and flips,
    all in one resampling."""
    h0, w0 = mask.shape
    h, w = out_size
    identity = zoom == 1.0 and angle == 0.0 and tuple(shift) == (0.0, 0.0) and not hflip and not vflip
    if identity and (h, w) == (h0, w0):
        return image, mask
    im = Image.fromarray(image)
    mk = Image.fromarray(mask.astype(np.uint8), mode="L")
    if identity:
        return np.asarray(im.resize((w, h), Image.BILINEAR)), np.asarray(mk.resize((w, h), Image.NEAREST))
    # Output pixel p samples the source at c_in + S R F (p - c_out - shift), in PIL's continuous
    # coordinates (pixel centres at +0.5), so identity parameters give a plain resize; F holds
    # the flips, R the rotation, S the scale from output to source pixels.
    sx, sy = w0 / w / zoom, h0 / h / zoom
    fx, fy = (-1.0 if hflip else 1.0), (-1.0 if vflip else 1.0)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    a, b = c * sx * fx, -s * sx * fy
    d, e = s * sy * fx, c * sy * fy
    ox, oy = w / 2 + shift[1], h / 2 + shift[0]
    coeffs = (a, b, w0 / 2 - a * ox - b * oy, d, e, h0 / 2 - d * ox - e * oy)
    img = im.transform((w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    msk = mk.transform((w, h), Image.AFFINE, coeffs, resample=Image.NEAREST, fillcolor=ignore_index)
    return np.asarray(img), np.asarray(msk)


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def jitter_matrix(
    channel_mean: np.ndarray, bright: float, contrast: float, saturation: float
) -> tuple[np.ndarray, float]:
    """(A [3, 3], c) such that ``A x + c`` applies, to an RGB pixel x in [0, 1], brightness
    (scale by ``bright``), then contrast (about the image's mean grey), then saturation (about the
    pixel's own grey), as torchvision's ColorJitter does in that order. ``channel_mean``: the
    image's mean RGB in [0, 1]. Clipping to [0, 1] is left to the caller (done once, at the end)."""
    mu = bright * float(channel_mean @ _LUMA)  # mean grey after brightness
    sat = saturation * np.eye(3) + (1.0 - saturation) * np.outer(np.ones(3), _LUMA)
    # The luma weights sum to 1, so the saturation step maps the grey offset to itself.
    return contrast * bright * sat, (1.0 - contrast) * mu


def to_tensors(
    image: np.ndarray,
    mask: np.ndarray,
    color: tuple[np.ndarray, float] | None = None,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image [H, W, 3] -> float32 [3, H, W] normalised with ``mean``/``std`` (on [0, 1] values;
    ImageNet's by default) after the colour map ``color`` = (A, c), clipped; mask -> int64 [H, W]."""
    h, w, _ = image.shape
    # Channels-first copy while still uint8 (a quarter of the bytes of a float copy); it is also
    # writable, unlike the arrays PIL hands out, which torch warns about.
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).view(3, h * w).float()
    std = torch.as_tensor(IMAGENET_STD if std is None else std, dtype=torch.float32)[:, None]
    mean = torch.as_tensor(IMAGENET_MEAN if mean is None else mean, dtype=torch.float32)[:, None]
    if color is None:
        y = x.mul_(1.0 / 255.0)
    else:
        a, c = color
        y = (torch.from_numpy((a / 255.0).astype(np.float32)) @ x).add_(c).clamp_(0.0, 1.0)
    y = y.sub_(mean).div_(std).view(3, h, w)
    return y, torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))


def transform_pair(
    image: np.ndarray,
    mask: np.ndarray,
    out_size: tuple[int, int] | None,
    rng: np.random.Generator | None = None,
    cfg: AugmentConfig | None = None,
    ignore_index: int = 255,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to ``out_size`` (None: keep), augment when ``rng`` is given, normalise with
    ``mean``/``std`` (ImageNet's by default)."""
    out_size = tuple(mask.shape) if out_size is None else tuple(out_size)
    if rng is None:
        image, mask = warp_pair(image, mask, out_size, ignore_index=ignore_index)
        return to_tensors(image, mask, None, mean, std)
    cfg = cfg or AugmentConfig()
    zoom = math.exp(rng.uniform(math.log(cfg.scale[0]), math.log(cfg.scale[1])))
    angle = rng.uniform(-cfg.rotate, cfg.rotate)
    shift = tuple(rng.uniform(-cfg.translate, cfg.translate) * n for n in out_size)
    hflip, vflip = rng.random() < cfg.hflip, rng.random() < cfg.vflip
    image, mask = warp_pair(image, mask, out_size, zoom, angle, shift, hflip, vflip, ignore_index)
    bright = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    contrast = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    saturation = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    # A strided subsample estimates the mean grey well enough at a sixteenth of the cost.
    channel_mean = image[::4, ::4].reshape(-1, 3).mean(0) / 255.0
    return to_tensors(image, mask, jitter_matrix(channel_mean, bright, contrast, saturation), mean, std)
