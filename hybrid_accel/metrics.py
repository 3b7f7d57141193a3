"""Dice and average symmetric surface distance (ASSD) per foreground class, per image.

Definitions follow medpy 0.5.2 (``medpy.metric.binary.dc`` and ``assd`` with connectivity 1),
which the tests check to 1e-6 on random masks:

- Dice = 2 |P & G| / (|P| + |G|).
- The surface of a mask is the mask minus its erosion by the 4-connected cross, with everything
  outside the image counted as background (so pixels on the image edge are surface pixels).
- ASSD = the mean of the pooled distances: from every surface pixel of P to the nearest surface
  pixel of G, and from every surface pixel of G to the nearest surface pixel of P. Distances are
  Euclidean in physical units, ``spacing`` giving the pixel size along (rows, columns).

medpy raises on empty masks; here every class of every image falls into one of four cases, and
the summary says how many images each case touched:

=========== ============================== ====== ===========================================
case        condition                      Dice   ASSD
=========== ============================== ====== ===========================================
normal      both non-empty                 value  value
both_empty  class absent from both         1.0    0.0 (included in the mean)
pred_empty  in the truth, not predicted    0.0    undefined: NaN, left out of the mean, counted
gt_empty    predicted, not in the truth    0.0    undefined: NaN, left out of the mean, counted
=========== ============================== ====== ===========================================

Pixels of the truth equal to ``ignore_index`` are left out of both masks.

:func:`spearman` is the rank correlation used for gamma against the weak masks' true quality (by the
trainer's log, the audit and the reproduction report).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = [
    "CASES",
    "NORMAL",
    "BOTH_EMPTY",
    "PRED_EMPTY",
    "GT_EMPTY",
    "EMPTY_RULES",
    "dice_binary",
    "assd_binary",
    "dice_assd",
    "summarize",
    "spearman",
]

NORMAL, BOTH_EMPTY, PRED_EMPTY, GT_EMPTY = 0, 1, 2, 3
CASES = ("normal", "both_empty", "pred_empty", "gt_empty")
EMPTY_RULES = {
    "normal": "prediction and truth both non-empty: Dice and ASSD computed",
    "both_empty": "class absent from prediction and truth: Dice 1, ASSD 0, both included in the means",
    "pred_empty": "class in the truth but not predicted: Dice 0 (included), ASSD undefined "
    "(NaN, excluded from the ASSD mean, counted here)",
    "gt_empty": "class predicted but absent from the truth: Dice 0 (included), ASSD undefined "
    "(NaN, excluded from the ASSD mean, counted here)",
}

# The 4-connected cross: medpy's footprint for connectivity 1.
_CROSS = ndimage.generate_binary_structure(2, 1)


def _surface_points(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Coordinates (in physical units) of the surface pixels of a non-empty boolean mask."""
    # binary_erosion's border_value=0 treats outside the array as background, as medpy does; so
    # cropping to a bounding box (outside which everything is background) changes nothing.
    border = mask & ~ndimage.binary_erosion(mask, structure=_CROSS)
    return np.argwhere(border) * spacing


def _bbox(mask: np.ndarray) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def dice_binary(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (as medpy's ``dc``)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    denom = int(pred.sum()) + int(gt.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & gt)) / denom


def assd_binary(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> float:
    """ASSD of two non-empty 2-D boolean masks (medpy's ``assd``, connectivity 1).

    Returns NaN when exactly one mask is empty and 0.0 when both are (see the module docstring).
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise ValueError(f"expected two 2-D masks of the same shape, got {pred.shape} and {gt.shape}")
    has_p, has_g = pred.any(), gt.any()
    if not has_p and not has_g:
        return 0.0
    if not has_p or not has_g:
        return math.nan
    box = _bbox(pred | gt)
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (2,):
        raise ValueError(f"spacing must have 2 values (rows, columns), got {spacing!r}")
    pts_p = _surface_points(pred[box], sp)
    pts_g = _surface_points(gt[box], sp)
    # Nearest-neighbour queries between the two surfaces give exactly the distances medpy reads off
    # a Euclidean distance transform, at a fraction of the cost (only surface pixels are visited).
    d_pg = cKDTree(pts_g).query(pts_p, k=1)[0]
    d_gp = cKDTree(pts_p).query(pts_g, k=1)[0]
    # medpy pools both directions before averaging (not the mean of the two means).
    return float((d_pg.sum() + d_gp.sum()) / (d_pg.size + d_gp.size))


def dice_assd(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    spacing: Sequence[float] = (1.0, 1.0),
    ignore_index: int | None = 255,
) -> dict[str, np.ndarray]:
    """Per-class Dice, ASSD and empty-mask case for one image.

    Args:
        pred: predicted class indices, [H, W] integers in 0..num_classes-1.
        gt: true class indices, [H, W]; pixels equal to ``ignore_index`` are left out.
        num_classes: number of classes including background (class 0, which is not scored).
        spacing: pixel size along rows and columns.

    Returns:
        ``{"dice": float64[K], "assd": float64[K], "case": int8[K]}`` with K = num_classes - 1,
        entry k describing class k + 1; ``case`` holds indices into ``CASES``.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred and gt must be 2-D of the same shape, got {pred.shape} and {gt.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if ignore_index is not None:
        valid = gt != ignore_index
        if not valid.all():
            # Background in both masks where the truth is unknown: those pixels count nowhere.
            pred = np.where(valid, pred, 0)
            gt = np.where(valid, gt, 0)
    k = num_classes - 1
    dice = np.empty(k, dtype=np.float64)
    assd = np.empty(k, dtype=np.float64)
    case = np.empty(k, dtype=np.int8)
    for c in range(1, num_classes):
        p = pred == c
        g = gt == c
        has_p, has_g = bool(p.any()), bool(g.any())
        if has_p and has_g:
            case[c - 1] = NORMAL
            dice[c - 1] = dice_binary(p, g)
            assd[c - 1] = assd_binary(p, g, spacing)
        elif not has_p and not has_g:
            case[c - 1], dice[c - 1], assd[c - 1] = BOTH_EMPTY, 1.0, 0.0
        elif has_g:
            case[c - 1], dice[c - 1], assd[c - 1] = PRED_EMPTY, 0.0, math.nan
        else:
            case[c - 1], dice[c - 1], assd[c - 1] = GT_EMPTY, 0.0, math.nan
    return {"dice": dice, "assd": assd, "case": case}


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def summarize(
    dice: np.ndarray,
    assd: np.ndarray,
    case: np.ndarray,
    class_names: Iterable[str] | None = None,
) -> dict:
    """Aggregate per-image results ([N, K] arrays from stacked ``dice_assd`` outputs).

    Per class: mean Dice over all N images, mean ASSD over the images where it is defined, and
    the number of images in each case. ``mean_dice``/``mean_assd`` average the per-class means.
    """
    dice = np.asarray(dice, dtype=np.float64)
    assd = np.asarray(assd, dtype=np.float64)
    case = np.asarray(case)
    if dice.ndim != 2 or dice.shape != assd.shape or dice.shape != case.shape:
        raise ValueError(f"expected three [N, K] arrays, got {dice.shape}, {assd.shape}, {case.shape}")
    k = dice.shape[1]
    names = list(class_names) if class_names is not None else [f"class{c}" for c in range(1, k + 1)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} foreground classes")
    per_class = {}
    for j, name in enumerate(names):
        per_class[name] = {
            "dice": float(dice[:, j].mean()) if dice.shape[0] else math.nan,
            "assd": _nanmean(assd[:, j]),
            "assd_n": int((~np.isnan(assd[:, j])).sum()),
            "counts": {label: int((case[:, j] == i).sum()) for i, label in enumerate(CASES)},
        }
    dice_means = np.array([v["dice"] for v in per_class.values()])
    assd_means = np.array([v["assd"] for v in per_class.values()])
    return {
        "n_images": int(dice.shape[0]),
        "mean_dice": _nanmean(dice_means),
        "mean_assd": _nanmean(assd_means),
        "per_class": per_class,
        "counts": {label: int((case == i).sum()) for i, label in enumerate(CASES)},
    }


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties) over the pairs where both are finite;
    nan when fewer than 3 such pairs remain or either side is constant."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return math.nan
    return float(spearmanr(a[ok], b[ok]).statistic)
