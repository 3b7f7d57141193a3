"""Weak-label simulators: exact mask in, cheap distorted mask out, with its true quality.

Each simulator takes an exact class-index mask and a severity in [0, 1] (0: the best such an
annotator would draw, 1: a careless one) and returns a weak mask of the same shape:

- ``ellipse``: an ellipse fitted (by second moments) to every connected object of every
  foreground class, then scaled per axis, shifted and rotated by amounts that grow with the
  severity;
- ``box``: the bounding box of every object, each side moved (mostly outward) and shifted;
- ``scribble``: a few strokes inside every class region (background included), the rest set to
  the ignore value; with severity the strokes are shifted off their region so some of them
  label the wrong class;
- ``drop``: a missed annotation, every foreground pixel replaced by background (the paper drops
  40% of the weak polyp masks this way).

:class:`WeakSpec` draws, for a set of weak instances, which simulator each one gets, its
severity, and exactly which ``drop_fraction`` of them are dropped.

True quality (:func:`weak_quality`): IoU and Dice of the weak mask against the exact one, per
foreground class, averaged over the foreground classes present in either, computed on the pixels
the weak mask labels (so a scribble that is all correct scores 1: it is sparse, not wrong). When
neither mask has foreground there, both scores are 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

SIMULATORS = ("ellipse", "box", "scribble", "drop")


# ---------------------------------------------------------------------------------------------
# Configuration: simulator mixtures and severity distributions


def parse_severity(spec: str | float | int) -> Callable[[np.random.Generator], float]:
    """A severity sampler from ``0.5``, ``"const:0.5"``, ``"uniform:a,b"`` or ``"beta:a,b"``."""
    if isinstance(spec, (int, float)):
        v = float(spec)
        return lambda rng: v
    name, _, args = str(spec).partition(":")
    name = name.strip().lower()
    try:
        vals = [float(a) for a in args.split(",")] if args else []
        if name in ("const", "constant"):
            (v,) = vals
            return lambda rng: v
        if name == "uniform":
            lo, hi = vals
            return lambda rng: float(rng.uniform(lo, hi))
        if name == "beta":
            a, b = vals
            return lambda rng: float(rng.beta(a, b))
        if not args:
            v = float(name)
            return lambda rng: v
    except ValueError:
        pass
    raise ValueError(f"severity {spec!r}: expected a number, const:x, uniform:a,b or beta:a,b")


def parse_mixture(spec: str | dict) -> dict[str, float]:
    """``"ellipse"`` or ``"ellipse:0.6,box:0.2,scribble:0.2"`` (or a dict) -> normalised weights."""
    if isinstance(spec, dict):
        items = {str(k): float(v) for k, v in spec.items()}
    else:
        items = {}
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            name, _, w = part.partition(":")
            try:
                items[name.strip().lower()] = float(w) if w else 1.0
            except ValueError:
                raise ValueError(f"weak spec {spec!r}: weight of {name!r} is not a number") from None
    unknown = [k for k in items if k not in SIMULATORS]
    if unknown or not items:
        raise ValueError(f"weak spec {spec!r}: unknown simulator(s) {unknown}; choose from {', '.join(SIMULATORS)}")
    total = sum(items.values())
    if total <= 0 or any(v < 0 for v in items.values()):
        raise ValueError(f"weak spec {spec!r}: weights must be non-negative and not all zero")
    return {k: v / total for k, v in items.items()}


@dataclass
class WeakSpec:
    """How weak annotations are simulated for a set of instances.

    ``types``: simulator mixture (see :func:`parse_mixture`); ``severity``: distribution of the
    per-instance severity (see :func:`parse_severity`); ``drop_fraction``: the fraction of weak
    instances whose foreground is dropped entirely (exactly ``round(drop_fraction * n)`` of them).
    """

    types: str | dict = "ellipse"
    severity: str | float = "uniform:0,1"
    drop_fraction: float = 0.0
    _mixture: dict[str, float] = field(init=False, repr=False)

    def __post_init__(self):
        self._mixture = parse_mixture(self.types)
        self._severity = parse_severity(self.severity)
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must lie in [0, 1], got {self.drop_fraction}")

    def plan(self, n: int, rng: np.random.Generator) -> list[tuple[str, float]]:
        """(simulator, severity) for ``n`` weak instances; dropped ones get severity nan."""
        n_drop = int(round(self.drop_fraction * n))
        dropped = np.zeros(n, dtype=bool)
        dropped[rng.permutation(n)[:n_drop]] = True
        names = list(self._mixture)
        probs = np.array([self._mixture[k] for k in names])
        out = []
        for i in range(n):
            # Draw type and severity for every instance so the plan of the others does not
            # depend on which ones are dropped.
            name = names[int(rng.choice(len(names), p=probs))]
            sev = float(np.clip(self._severity(rng), 0.0, 1.0))
            out.append(("drop", math.nan) if dropped[i] else (name, sev if name != "drop" else math.nan))
        return out


# ---------------------------------------------------------------------------------------------
# Geometry helpers


def objects(mask: np.ndarray, ignore_index: int = 255) -> list[tuple[int, np.ndarray]]:
    """(class, boolean mask) of every connected foreground object, largest first."""
    out = []
    for c in np.unique(mask):
        c = int(c)
        if c == 0 or c == ignore_index:
            continue
        lab, n = ndimage.label(mask == c)
        if n == 0:
            continue
        areas = np.bincount(lab.ravel())
        for k in range(1, n + 1):
            out.append((c, areas[k], lab == k))
    out.sort(key=lambda t: -t[1])
    return [(c, m) for c, _, m in out]


def fit_ellipse(obj: np.ndarray) -> tuple[float, float, float, float, float]:
    """(cy, cx, semi-major, semi-minor, angle in radians) with the object's second moments."""
    ys, xs = np.nonzero(obj)
    cy, cx = ys.mean(), xs.mean()
    if len(ys) < 3:
        return float(cy), float(cx), 1.0, 1.0, 0.0
    cov = np.cov(np.stack([xs, ys]).astype(np.float64), bias=True)
    evals, evecs = np.linalg.eigh(cov)
    # A filled ellipse with semi-axis a has variance a^2/4 along that axis; the 1/12 is
    # the variance of one pixel.
    evals = np.maximum(evals - 1.0 / 12.0, 0.25)
    a, b = 2.0 * math.sqrt(evals[1]), 2.0 * math.sqrt(evals[0])
    theta = math.atan2(evecs[1, 1], evecs[0, 1])
    return float(cy), float(cx), a, b, theta


def draw_ellipse(shape: tuple[int, int], cy: float, cx: float, a: float, b: float, theta: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(theta), math.sin(theta)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    return (u / max(a, 0.5)) ** 2 + (v / max(b, 0.5)) ** 2 <= 1.0


def shift_bool(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate a boolean mask by whole pixels, filling with False (no wrap-around)."""
    out = np.zeros_like(m)
    h, w = m.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    if abs(dy) < h and abs(dx) < w:
        out[yd, xd] = m[ys, xs]
    return out


def _random_sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


# ---------------------------------------------------------------------------------------------
# Simulators


def simulate_ellipse(mask: np.ndarray, severity: float, rng: np.random.Generator, ignore_index: int = 255) -> np.ndarray:
    out = np.where(mask == ignore_index, ignore_index, 0).astype(mask.dtype)
    for c, obj in objects(mask, ignore_index)[::-1]:  # smallest last so it stays visible
        cy, cx, a, b, theta = fit_ellipse(obj)
        a *= math.exp(severity * rng.uniform(0.15, 0.6) * _random_sign(rng))
        b *= math.exp(severity * rng.uniform(0.15, 0.6) * _random_sign(rng))
        r = math.sqrt(a * b)
        ang = rng.uniform(0, 2 * math.pi)
        dist = severity * rng.uniform(0.1, 0.5) * r
        cy, cx = cy + dist * math.sin(ang), cx + dist * math.cos(ang)
        theta += severity * math.radians(rng.uniform(-45, 45))
        out[draw_ellipse(mask.shape, cy, cx, a, b, theta)] = c
    return out


def simulate_box(mask: np.ndarray, severity: float, rng: np.random.Generator, ignore_index: int = 255) -> np.ndarray:
    out = np.where(mask == ignore_index, ignore_index, 0).astype(mask.dtype)
    h, w = mask.shape
    for c, obj in objects(mask, ignore_index)[::-1]:
        ys, xs = np.nonzero(obj)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        bh, bw = y1 - y0, x1 - x0
        # Annotators mostly draw boxes too loose rather than too tight.
        d = severity * rng.uniform(-0.15, 0.4, size=4)
        sy, sx = severity * rng.uniform(-0.2, 0.2, size=2)
        y0 = int(round(y0 - d[0] * bh + sy * bh))
        y1 = int(round(y1 + d[1] * bh + sy * bh))
        x0 = int(round(x0 - d[2] * bw + sx * bw))
        x1 = int(round(x1 + d[3] * bw + sx * bw))
        y0, y1 = max(0, min(y0, h - 1)), max(1, min(y1, h))
        x0, x1 = max(0, min(x0, w - 1)), max(1, min(x1, w))
        if y1 <= y0:
            y1 = y0 + 1
        if x1 <= x0:
            x1 = x0 + 1
        out[y0:y1, x0:x1] = c
    return out


def _stroke(region: np.ndarray, dt: np.ndarray, rng: np.random.Generator, radius: int, spill: float) -> np.ndarray:
    """A polyline through a few interior points of ``region`` (``dt``: its distance transform),
    clipped to the region grown by ``spill`` pixels (0: strictly inside)."""
    top = dt.max()
    if top <= 0:
        return np.zeros_like(region)
    cand = np.argwhere(dt >= max(1.0, 0.4 * top))
    k = min(len(cand), int(rng.integers(2, 5)))
    pts = cand[rng.choice(len(cand), size=k, replace=False)].astype(np.float64)
    if k > 1:
        # Order the anchors along the region's main axis so the stroke does not zigzag.
        _, _, _, _, theta = fit_ellipse(region)
        proj = pts[:, 1] * math.cos(theta) + pts[:, 0] * math.sin(theta)
        pts = pts[np.argsort(proj)]
    line = np.zeros_like(region)
    line[int(pts[0, 0]), int(pts[0, 1])] = True
    for p, q in zip(pts[:-1], pts[1:]):
        n = int(np.ceil(np.abs(q - p).max() * 2)) + 1
        t = np.linspace(0.0, 1.0, n)[:, None]
        seg = np.rint(p + t * (q - p)).astype(np.int64)
        line[seg[:, 0], seg[:, 1]] = True
    if radius > 0:
        line = ndimage.binary_dilation(line, iterations=radius)
    if spill >= 1:
        return line & (ndimage.distance_transform_edt(~region) <= spill)
    return line & region


def simulate_scribble(
    mask: np.ndarray, severity: float, rng: np.random.Generator, ignore_index: int = 255
) -> np.ndarray:
    """Strokes inside every class region, the rest ignore.

    With severity, strokes run past the region's border (by up to ``0.5 * severity`` of the
    region's half-thickness) and are shifted (by ``severity * U(0.3, 1.2)`` of it), so some of
    their pixels label the wrong class; scaling by the half-thickness (the largest distance to
    the border) treats thin bands such as a cornea and round polyps alike.
    """
    h, w = mask.shape
    out = np.full(mask.shape, ignore_index, dtype=mask.dtype)
    radius = max(1, int(round(min(h, w) / 128)))
    regions: list[tuple[int, np.ndarray, int]] = []
    bg = mask == 0
    if bg.any():
        regions.append((0, bg, 2))
    for c, obj in objects(mask, ignore_index):
        regions.append((c, obj, 1))
    for c, region, n_strokes in regions:
        dt = ndimage.distance_transform_edt(region)
        half = float(dt.max())
        for _ in range(n_strokes):
            s = _stroke(region, dt, rng, radius, severity * 0.5 * half)
            if severity > 0:
                ang = rng.uniform(0, 2 * math.pi)
                dist = severity * rng.uniform(0.3, 1.2) * half
                s = shift_bool(s, int(round(dist * math.sin(ang))), int(round(dist * math.cos(ang))))
            out[s] = c
    return out


def simulate_drop(mask: np.ndarray, severity: float = math.nan, rng=None, ignore_index: int = 255) -> np.ndarray:
    return np.where(mask == ignore_index, ignore_index, 0).astype(mask.dtype)


_SIMULATORS = {
    "ellipse": simulate_ellipse,
    "box": simulate_box,
    "scribble": simulate_scribble,
    "drop": simulate_drop,
}


def simulate(
    mask: np.ndarray, kind: str, severity: float, rng: np.random.Generator, ignore_index: int = 255
) -> np.ndarray:
    """Weak mask of ``kind`` (one of :data:`SIMULATORS`) from the exact ``mask``."""
    try:
        fn = _SIMULATORS[kind]
    except KeyError:
        raise ValueError(f"unknown weak simulator {kind!r}; choose from {', '.join(SIMULATORS)}") from None
    return fn(np.asarray(mask), 0.0 if kind == "drop" else float(severity), rng, ignore_index)


def weak_quality(weak: np.ndarray, exact: np.ndarray, ignore_index: int = 255) -> tuple[float, float]:
    """(IoU, Dice) of ``weak`` against ``exact`` (see the module docstring for the convention)."""
    valid = (weak != ignore_index) & (exact != ignore_index)
    wv, ev = weak[valid], exact[valid]
    classes = np.union1d(np.unique(wv), np.unique(ev))
    classes = classes[classes != 0]
    if len(classes) == 0:
        return 1.0, 1.0
    ious, dices = [], []
    for c in classes:
        a, b = wv == c, ev == c
        inter = np.count_nonzero(a & b)
        sa, sb = np.count_nonzero(a), np.count_nonzero(b)
        ious.append(inter / (sa + sb - inter))
        dices.append(2 * inter / (sa + sb))
    return float(np.mean(ious)), float(np.mean(dices))


def boundary_band(mask: np.ndarray, width: float, ignore_index: int = 255) -> np.ndarray:
    """Bool [H, W]: the labelled pixels near every foreground object's outline.

    For region-shaped weak masks (ellipses, boxes) whose outline is where they are wrong: on the
    simulated ellipses of hybrid CVC-ClinicDB a band of 0.3 (below) holds 84% of the wrongly labelled
    pixels and 8% of the rightly labelled ones (benchmarks/RESULTS.md, section 5). The band of an
    object with ``A`` pixels spans ``max(1, round(width * sqrt(A / pi)))`` pixels (Euclidean) on each
    side of its outline: a fraction ``width`` of the radius of the disc of the same area, so that it
    scales with the object. Pixels that are ``ignore_index`` are never in it; a mask without
    foreground (a dropped annotation, which keeps saying "no object") and ``width`` 0 have none.
    """
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    band = np.zeros(mask.shape, dtype=bool)
    if width == 0:
        return band
    H, W = mask.shape
    for _, obj in objects(mask, ignore_index):
        area = int(obj.sum())
        k = max(1, int(round(width * math.sqrt(area / math.pi))))
        ys, xs = np.nonzero(obj)  # work in the object's box grown by k (plus one for the outline)
        y0, y1 = max(0, ys.min() - k - 1), min(H, ys.max() + k + 2)
        x0, x1 = max(0, xs.min() - k - 1), min(W, xs.max() + k + 2)
        o = obj[y0:y1, x0:x1]
        # distance_transform_edt(a): each nonzero pixel's distance to the nearest zero pixel
        inner = o & (ndimage.distance_transform_edt(o) <= k)
        outer = ~o & (ndimage.distance_transform_edt(~o) <= k)
        band[y0:y1, x0:x1] |= inner | outer
    return band & (mask != ignore_index)


def ignore_boundary_band(mask: np.ndarray, width: float, ignore_index: int = 255) -> np.ndarray:
    """``mask`` with :func:`boundary_band` set to ``ignore_index`` (``width`` 0: ``mask`` itself)."""
    if width == 0:
        return mask
    out = mask.copy()
    out[boundary_band(mask, width, ignore_index)] = ignore_index
    return out
