import math

import numpy as np
import pytest

from hybrid_accel.metrics import (
    BOTH_EMPTY,
    CASES,
    GT_EMPTY,
    NORMAL,
    PRED_EMPTY,
    assd_binary,
    dice_assd,
    dice_binary,
    spearman,
    summarize,
)

medpy_binary = pytest.importorskip("medpy.metric.binary")


def _square(shape, top, left, size):
    m = np.zeros(shape, dtype=bool)
    m[top : top + size, left : left + size] = True
    return m


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _medpy_assd(p, g, spacing=(1.0, 1.0)):
    return medpy_binary.assd(p, g, voxelspacing=spacing, connectivity=1)


def test_against_medpy_on_random_masks():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(150):
        h, w = rng.integers(2, 48, size=2)
        density = rng.uniform(0.02, 0.95, size=2)
        p = rng.random((h, w)) < density[0]
        g = rng.random((h, w)) < density[1]
        if rng.random() < 0.3:  # blocky masks as well as salt-and-pepper
            p = np.kron(p[: h // 4 + 1, : w // 4 + 1], np.ones((4, 4), bool))[:h, :w]
        if not p.any() or not g.any():
            continue
        spacing = tuple(rng.uniform(0.2, 3.0, size=2))
        assert assd_binary(p, g, spacing) == pytest.approx(_medpy_assd(p, g, spacing), abs=1e-6)
        assert dice_binary(p, g) == pytest.approx(medpy_binary.dc(p, g), abs=1e-6)
        checked += 1
    assert checked > 100


def test_against_medpy_on_blobs_touching_the_border():
    rng = np.random.default_rng(1)
    for _ in range(20):
        shape = (40, 52)
        p = _disk(shape, rng.integers(-5, 45), rng.integers(-5, 57), rng.uniform(4, 20))
        g = _disk(shape, rng.integers(-5, 45), rng.integers(-5, 57), rng.uniform(4, 20))
        if not p.any() or not g.any():
            continue
        assert assd_binary(p, g) == pytest.approx(_medpy_assd(p, g), abs=1e-6)


def test_shifted_square():
    # 10x10 squares, G shifted 3 columns right of P. Surface of P (36 pixels), distances to the
    # nearest surface pixel of G:
    #   top and bottom rows: columns 5, 6, 7 -> 3, 2, 1; columns 8..14 lie on G's surface -> 0
    #   left side (rows 6..13, column 5): 3 from G's left side
    #   right side (rows 6..13, column 14, inside G): min(3 to G's right side, distance to
    #   G's top or bottom row) = 1, 2, 3, 3, 3, 3, 2, 1
    # G's surface mirrors P's, so ASSD = (2 * 6 + 8 * 3 + 18) / 36 = 1.5.
    p = _square((30, 30), 5, 5, 10)
    g = _square((30, 30), 5, 8, 10)
    assert assd_binary(p, g) == pytest.approx(1.5, abs=1e-12)
    assert assd_binary(p, g) == pytest.approx(_medpy_assd(p, g), abs=1e-12)
    assert dice_binary(p, g) == pytest.approx(2 * 70 / 200)


def test_identical_masks():
    p = _disk((32, 32), 16, 16, 9)
    assert assd_binary(p, p) == 0.0
    assert dice_binary(p, p) == 1.0


def test_disk_vs_square():
    d = _disk((64, 64), 32, 32, 12)
    s = _square((64, 64), 20, 20, 25)
    assert assd_binary(d, s) == pytest.approx(_medpy_assd(d, s), abs=1e-9)
    assert 0.5 < assd_binary(d, s) < 5.0


def test_border_touching_square():
    # A mask filling whole rows: the image edge counts as outside, so its pixels on the edge
    # are surface pixels (medpy's binary_erosion default border_value=0).
    p = np.zeros((10, 10), bool)
    p[:4] = True
    g = np.zeros((10, 10), bool)
    g[:6] = True
    assert assd_binary(p, g) == pytest.approx(_medpy_assd(p, g), abs=1e-12)
    full = np.ones((8, 8), bool)
    small = _square((8, 8), 0, 0, 4)
    assert assd_binary(full, small) == pytest.approx(_medpy_assd(full, small), abs=1e-12)


def test_spacing():
    p = _square((20, 20), 4, 4, 6)
    g = _square((20, 20), 6, 4, 6)  # shifted 2 rows down
    for spacing in [(1.0, 1.0), (0.5, 2.0), (3.0, 0.25)]:
        assert assd_binary(p, g, spacing) == pytest.approx(_medpy_assd(p, g, spacing), abs=1e-12)
    # Two full-width lines 4 rows apart: every surface pixel is 4 row steps from the other line.
    a = np.zeros((10, 12), bool)
    b = np.zeros((10, 12), bool)
    a[2] = True
    b[6] = True
    assert assd_binary(a, b, (0.5, 7.0)) == pytest.approx(2.0, abs=1e-12)
    assert assd_binary(a, b, (3.0, 0.1)) == pytest.approx(12.0, abs=1e-12)


@pytest.mark.parametrize(
    "has_pred, has_gt, case, dice, assd",
    [
        (False, False, BOTH_EMPTY, 1.0, 0.0),
        (False, True, PRED_EMPTY, 0.0, math.nan),
        (True, False, GT_EMPTY, 0.0, math.nan),
        (True, True, NORMAL, 1.0, 0.0),
    ],
)
def test_empty_cases(has_pred, has_gt, case, dice, assd):
    pred = np.zeros((12, 12), np.int64)
    gt = np.zeros((12, 12), np.int64)
    if has_pred:
        pred[2:6, 2:6] = 1
    if has_gt:
        gt[2:6, 2:6] = 1
    out = dice_assd(pred, gt, num_classes=2)
    assert out["case"].tolist() == [case]
    assert out["dice"][0] == dice
    if math.isnan(assd):
        assert math.isnan(out["assd"][0])
    else:
        assert out["assd"][0] == assd


def test_multiclass_and_ignore():
    gt = np.zeros((16, 16), np.int64)
    gt[2:8, 2:8] = 1
    gt[10:14, 10:14] = 2
    pred = gt.copy()
    pred[2:8, 2:5] = 0  # class 1 half missed
    gt[0, :] = 255  # ignored row: predictions there are not counted
    pred[0, :] = 2
    out = dice_assd(pred, gt, num_classes=4)
    assert out["case"].tolist() == [NORMAL, NORMAL, BOTH_EMPTY]
    assert out["dice"][0] == pytest.approx(2 * 18 / (18 + 36))
    assert out["dice"][1] == 1.0 and out["assd"][1] == 0.0
    assert out["dice"][2] == 1.0
    p1, g1 = pred == 1, gt == 1
    assert out["assd"][0] == pytest.approx(_medpy_assd(p1, g1), abs=1e-12)


def test_summarize_counts_and_means():
    dice = np.array([[0.5, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assd = np.array([[2.0, 0.0], [math.nan, math.nan], [0.0, math.nan]])
    case = np.array([[NORMAL, BOTH_EMPTY], [PRED_EMPTY, GT_EMPTY], [NORMAL, PRED_EMPTY]])
    s = summarize(dice, assd, case, ["a", "b"])
    assert s["n_images"] == 3
    assert s["per_class"]["a"]["dice"] == pytest.approx(0.5)
    assert s["per_class"]["a"]["assd"] == pytest.approx(1.0)
    assert s["per_class"]["a"]["assd_n"] == 2
    assert s["per_class"]["b"]["dice"] == pytest.approx(1 / 3)
    assert s["per_class"]["b"]["assd"] == 0.0
    assert s["per_class"]["b"]["counts"] == {"normal": 0, "both_empty": 1, "pred_empty": 1, "gt_empty": 1}
    assert s["counts"] == {"normal": 2, "both_empty": 1, "pred_empty": 2, "gt_empty": 1}
    assert s["mean_dice"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert s["mean_assd"] == pytest.approx(0.5)
    assert set(s["counts"]) == set(CASES)


def test_shape_errors():
    with pytest.raises(ValueError):
        dice_assd(np.zeros((4, 4)), np.zeros((4, 5)), 2)
    with pytest.raises(ValueError):
        assd_binary(np.ones((4, 4)), np.ones((4, 4)), spacing=(1.0,))


def test_spearman_ties_nonfinite_pairs_and_degenerate_cases():
    from scipy.stats import spearmanr

    a = np.array([0.1, 0.5, 0.5, 0.9, 0.2, 0.7])
    b = np.array([0.0, 0.3, 0.8, 0.8, 0.1, 0.6])
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-15)
    # a pair with a non-finite value on either side is left out
    a2, b2 = np.append(a, [np.nan, 0.3]), np.append(b, [0.2, np.inf])
    assert spearman(a2, b2) == spearman(a, b)
    assert spearman(a.astype(np.float32), b) == spearman(a, b)  # ranks do not depend on the storage dtype
    assert math.isnan(spearman(a[:2], b[:2]))  # fewer than 3 pairs
    assert math.isnan(spearman(np.full(6, 0.5), b))  # constant side
    assert math.isnan(spearman(a, np.full(6, np.nan)))
