"""Synthetic images with exact masks: polyp-like endoscopy frames and AS-OCT-like scans.

Both generators are pure functions of a ``numpy.random.Generator`` and a size, so a dataset is
reproducible from its seed image by image (image ``i`` uses ``default_rng([seed, 0, i])``).

The polyp task is meant to be hard enough that a few exact masks do not saturate it (DESIGN.md
section 10): polyp count, size, shape and contrast vary (some polyps are barely darker or
redder than the mucosa around them), the mucosa is textured and crossed by vessels and dark folds
that are not polyps, the frame has vignetting, an uneven light, specular highlights on both
mucosa and polyps, sensor noise and, in some frames, the black corners of the endoscope's field.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

POLYP_CLASSES = ("background", "polyp")
ASOCT_CLASSES = ("background", "cornea", "iris")
KINDS = {"polyp": POLYP_CLASSES, "asoct": ASOCT_CLASSES}


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise with about ``cells`` blobs across the shorter side."""
    h, w = shape
    ny = max(2, int(round(cells * h / min(h, w)))) + 2
    nx = max(2, int(round(cells * w / min(h, w)))) + 2
    small = rng.standard_normal((ny, nx)).astype(np.float32)
    # Resizing a small random grid (bicubic, through PIL) is far cheaper than a wide Gaussian
    # filter at full size and looks the same for texture.
    big = Image.fromarray(small, mode="F").resize((w + 2 * w // nx, h + 2 * h // ny), Image.BICUBIC)
    arr = np.asarray(big)
    oy, ox = h // ny, w // nx
    return arr[oy : oy + h, ox : ox + w]


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _blob(rng, yy, xx, cy, cx, r0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Irregular star-shaped blob: (signed distance to the edge in px, normalised radius, angle)."""
    elong = rng.uniform(1.0, 1.6)
    phi = rng.uniform(0, math.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * math.cos(phi) + dy * math.sin(phi)
    v = -dx * math.sin(phi) + dy * math.cos(phi)
    u = u / math.sqrt(elong)
    v = v * math.sqrt(elong)
    rho = np.sqrt(u * u + v * v)
    ang = np.arctan2(v, u)
    rad = np.ones_like(rho)
    for k in range(2, 6):
        rad += rng.uniform(0.0, 0.28) / k * np.cos(k * ang + rng.uniform(0, 2 * math.pi))
    rad *= r0
    return rad - rho, rho / rad, ang


FAINT = 0.35  # default share of polyps whose colour differs from the mucosa by only 2-8%


def _mucosa(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """The empty frame, float32 RGB [H, W, 3]: a pink-orange base with multi-scale texture,
    vessels (ridges of a noise field) and dark folds."""
    r = rng.uniform(0.55, 0.85)
    base = np.array([r, r * rng.uniform(0.35, 0.55), r * rng.uniform(0.25, 0.45)], dtype=np.float32)
    tex = 0.5 * smooth_noise(rng, size, 3) + 0.3 * smooth_noise(rng, size, 12) + 0.2 * smooth_noise(rng, size, 40)
    lum = 1.0 + rng.uniform(0.06, 0.18) * tex
    vessels = np.exp(-((smooth_noise(rng, size, 10) / 0.06) ** 2)) * rng.uniform(0.0, 0.25)
    folds = np.exp(-((smooth_noise(rng, size, 2.5) / rng.uniform(0.05, 0.12)) ** 2)) * rng.uniform(0.0, 0.4)
    img = base[None, None, :] * lum[..., None]
    img = img * (1.0 - vessels[..., None] * np.array([0.2, 0.8, 0.7], dtype=np.float32))
    return img * (1.0 - folds[..., None])


def _polyp_window(h: int, w: int, cy: float, cx: float, r0: float) -> tuple[slice, slice]:
    """Rows and columns around a polyp: it reaches at most ~2.3 r0 from its centre (shape
    harmonics, elongation and the shadow rim), and rendering in a window keeps it cheap."""
    m = int(2.3 * r0) + 4
    rows = slice(max(0, int(cy) - m), min(h, int(cy) + m + 1))
    cols = slice(max(0, int(cx) - m), min(w, int(cx) + m + 1))
    return rows, cols


def _polyp_tint(rng: np.random.Generator, faint: float) -> np.ndarray:
    """RGB factors of a polyp's colour change: faint (2-8%) with probability ``faint``, else clear (8-30%)."""
    contrast = rng.choice([rng.uniform(0.02, 0.08), rng.uniform(0.08, 0.3)], p=[faint, 1.0 - faint])
    return np.array([1.0, 1.0, 1.0], dtype=np.float32) + contrast * np.array(
        [rng.uniform(-0.2, 0.4), rng.uniform(-0.6, 0.1), rng.uniform(-0.5, 0.3)], dtype=np.float32
    )


def _add_polyp(
    rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, spec_prob: np.ndarray,
    yy: np.ndarray, xx: np.ndarray, size: tuple[int, int], faint: float,
) -> None:
    """Paint one polyp into ``img``, ``mask`` and ``spec_prob`` (in place); a polyp too small to
    cover a pixel leaves them unchanged.

    Appearance: a small (sometimes tiny) colour change, dome shading lit from one side, a faint
    shadow rim on the far side and its own fine texture."""
    h, w = size
    s = min(h, w)
    r0 = rng.uniform(0.06, 0.24) * s
    cy = rng.uniform(0.1, 0.9) * h
    cx = rng.uniform(0.1, 0.9) * w
    rows, cols = _polyp_window(h, w, cy, cx, r0)
    wy, wx = yy[rows, cols], xx[rows, cols]
    sd, rn, _ = _blob(rng, wy, wx, cy, cx, r0)
    edge = rng.uniform(0.8, 3.0)
    alpha = np.clip(sd / edge + 0.5, 0.0, 1.0)
    inside = alpha >= 0.5
    if not inside.any():
        return
    mask[rows, cols] |= inside
    tint = _polyp_tint(rng, faint)
    la = rng.uniform(0, 2 * math.pi)
    ly, lx = math.sin(la), math.cos(la)
    dome = np.clip(1.0 - rn * rn, 0.0, 1.0)
    direc = ((wy - cy) * ly + (wx - cx) * lx) / r0
    shade = 1.0 + rng.uniform(0.05, 0.25) * dome + rng.uniform(0.0, 0.15) * direc * (rn < 1.2)
    rim = np.exp(-(((rn - 1.0) / 0.12) ** 2)) * np.clip(-direc, 0, None) * rng.uniform(0.0, 0.3)
    ptex = 1.0 + rng.uniform(0.0, 0.1) * smooth_noise(rng, alpha.shape, 30 * min(alpha.shape) / s)
    win = img[rows, cols]
    poly = win * tint[None, None, :] * (shade * ptex)[..., None]
    win = win * (1.0 - alpha[..., None]) + poly * alpha[..., None]
    img[rows, cols] = win * (1.0 - rim[..., None])
    spec_prob[rows, cols] += dome * 1.5


def _specular(
    rng: np.random.Generator, img: np.ndarray, spec_prob: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """Specular highlights: peaks of a fine noise field, likelier where ``spec_prob`` (polyp domes) is high."""
    spots = smooth_noise(rng, size, rng.uniform(15, 35)) + 0.6 * spec_prob
    thr = rng.uniform(2.2, 3.0)
    spec = np.clip((spots - thr) / 0.3, 0.0, 1.0)
    return img * (1.0 - spec[..., None]) + spec[..., None] * 1.0


def _light(
    rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, yy: np.ndarray, xx: np.ndarray,
    size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Uneven illumination and vignetting, then in half of the frames the endoscope's black
    field stop (which also cuts the mask): ``(img, mask)``."""
    h, w = size
    cy, cx = h / 2 + rng.uniform(-0.1, 0.1) * h, w / 2 + rng.uniform(-0.1, 0.1) * w
    rr = np.sqrt(((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2)
    light = (1.0 - rng.uniform(0.25, 0.6) * np.clip(rr / 1.4, 0, 1) ** 2) * (1.0 + 0.15 * smooth_noise(rng, size, 1.5))
    img = img * light[..., None] * rng.uniform(0.8, 1.25)
    if rng.random() < 0.5:
        stop = rr < rng.uniform(1.15, 1.4)
        img = img * stop[..., None]
        mask &= stop
    return img, mask


def _sensor_noise_uint8(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Add sensor noise and quantise to uint8. Uniform rather than Gaussian noise: as good here
    and several times cheaper to draw."""
    sigma = np.float32(rng.uniform(0.005, 0.03) * math.sqrt(12.0))
    img = img + (rng.random(img.shape, dtype=np.float32) - np.float32(0.5)) * sigma
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def polyp_sample(
    rng: np.random.Generator, size: tuple[int, int] = (256, 256), faint: float = FAINT
) -> tuple[np.ndarray, np.ndarray]:
    """One endoscopy-like RGB frame (uint8 [H, W, 3]) and its binary polyp mask (uint8 [H, W]).

    ``faint``: probability that a polyp's colour change is faint (2-8%, barely visible) rather than
    clear (8-30%). The random draws do not depend on it, so a frame differs between two values only
    in the contrast of the polyps that switch group."""
    h, w = size
    yy, xx = _grid(h, w)
    img = _mucosa(rng, size)
    mask = np.zeros((h, w), dtype=bool)
    n_polyps = int(rng.choice([1, 2, 3], p=[0.65, 0.27, 0.08]))
    spec_prob = np.zeros((h, w), dtype=np.float32)
    for _ in range(n_polyps):
        _add_polyp(rng, img, mask, spec_prob, yy, xx, size, faint)
    img = _specular(rng, img, spec_prob, size)
    img, mask = _light(rng, img, mask, yy, xx, size)
    return _sensor_noise_uint8(rng, img), mask.astype(np.uint8)


def asoct_sample(rng: np.random.Generator, size: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """One AS-OCT-like greyscale scan (uint8 [H, W]) and its mask (0 background, 1 cornea, 2 iris).

    The cornea is a meniscus arching over the top (thin at the apex, thicker to the sides); the
    iris is two tapered bands left and right of the pupil, below the anterior chamber; the lens
    (not labelled) is a faint arc in the pupil; speckle, a central reflection artefact and
    signal fall-off towards the periphery make the edges uncertain.
    """
    h, w = size
    yy, xx = _grid(h, w)
    y, x = yy / h, xx / w
    mask = np.zeros((h, w), dtype=np.uint8)
    img = np.full((h, w), rng.uniform(0.03, 0.08), dtype=np.float32)

    # Iris first: the cornea is painted over it where they would meet at the angle.
    xc = 0.5 + rng.uniform(-0.05, 0.05)
    ya = rng.uniform(0.1, 0.22)
    k1 = rng.uniform(0.9, 1.6)
    t0 = rng.uniform(0.035, 0.06)
    front = ya + k1 * (x - xc) ** 2
    back = front + t0 * (1.0 + 3.0 * (x - xc) ** 2)
    y_plane = ya + rng.uniform(0.3, 0.42)
    pupil = rng.uniform(0.06, 0.15)
    bow = rng.uniform(-0.02, 0.05)
    iris_img = np.zeros((h, w), dtype=np.float32)
    for side in (-1, 1):
        root = xc + side * rng.uniform(0.3, 0.4)
        tip = xc + side * (pupil + rng.uniform(-0.01, 0.01))
        lo, hi = min(root, tip), max(root, tip)
        tpos = np.clip((x - tip) / (root - tip), 0.0, 1.0)  # 0 at the pupil, 1 at the root
        centre = y_plane + rng.uniform(-0.02, 0.02) - bow * (1.0 - tpos) - 0.06 * tpos**2
        thick = rng.uniform(0.04, 0.075) * (0.35 + 0.65 * np.sin(np.pi * np.clip(0.15 + 0.85 * tpos, 0, 1)))
        band = (np.abs(y - centre) < thick / 2) & (x >= lo) & (x <= hi)
        mask[band] = 2
        depth = np.clip((y - (centre - thick / 2)) / np.maximum(thick, 1e-3), 0.0, 1.0)
        iris_img += band * (rng.uniform(0.35, 0.6) + 0.25 * depth**3)
        # Shadow under the iris's pigment layer.
        below = (y > centre + thick / 2) & (x >= lo) & (x <= hi)
        img[below] *= 0.5
    iris_img *= 1.0 + 0.25 * smooth_noise(rng, size, 25)

    cornea = (y >= front) & (y <= back)
    mask[cornea] = 1
    mid = np.clip((y - front) / np.maximum(back - front, 1e-3), 0.0, 1.0)
    falloff = np.exp(-(((x - xc) / rng.uniform(0.3, 0.5)) ** 2))  # less signal where the beam is oblique
    cornea_img = cornea * (rng.uniform(0.45, 0.75) + 0.2 * np.exp(-((mid / 0.12) ** 2)) + 0.15 * np.exp(-(((1 - mid) / 0.1) ** 2)))
    cornea_img *= 0.35 + 0.65 * falloff

    img = np.where(mask == 2, iris_img, img)
    img = np.where(cornea, cornea_img, img)

    # Lens: faint arc in the pupil, not labelled.
    lens = np.abs(y - (y_plane + 0.03 + 0.8 * (x - xc) ** 2)) < 0.01
    img += lens * (np.abs(x - xc) < pupil) * rng.uniform(0.05, 0.2)
    # Central reflection artefact.
    if rng.random() < 0.5:
        img += np.exp(-(((x - xc) / 0.004) ** 2)) * rng.uniform(0.1, 0.4) * (y < y_plane + 0.2)

    img *= rng.standard_gamma(4.0, size=img.shape, dtype=np.float32) * np.float32(0.25)  # speckle
    img = np.clip(img * rng.uniform(0.8, 1.3), 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    img8 = (img * 255.0 + 0.5).astype(np.uint8)
    return img8, mask


GENERATORS = {"polyp": polyp_sample, "asoct": asoct_sample}


def synthetic_sample(
    kind: str, seed: int, index: int, size: tuple[int, int], faint: float = FAINT
) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of the synthetic dataset ``(kind, seed)``: the same for any dataset size.
    ``faint``: the polyp generator's share of barely visible polyps (ignored for AS-OCT)."""
    try:
        gen = GENERATORS[kind]
    except KeyError:
        raise ValueError(f"unknown synthetic kind {kind!r}; choose from {', '.join(GENERATORS)}") from None
    if not 0.0 <= faint <= 1.0:
        raise ValueError(f"faint={faint}: a share of polyps, in [0, 1]")
    rng = np.random.default_rng([seed, 0, index])
    return gen(rng, size, faint) if kind == "polyp" else gen(rng, size)
