"""Synthetic data, weak-label simulators and their recorded true quality."""

import math

import numpy as np
import pytest
import torch

from hybrid_accel.data import (
    HybridDataset,
    WeakSpec,
    load_manifest,
    make_synthetic_dataset,
    make_synthetic_hybrid,
    read_mask,
    simulate,
    synthetic_sample,
    weak_quality,
)
from hybrid_accel.data.weak import fit_ellipse, parse_mixture, parse_severity


@pytest.fixture(scope="module")
def polyp_masks():
    return [synthetic_sample("polyp", 3, i, (64, 64))[1] for i in range(16)]


def test_polyp_sample_shapes_and_variety():
    imgs, masks = zip(*(synthetic_sample("polyp", 0, i, (40, 56)) for i in range(12)))
    assert imgs[0].shape == (40, 56, 3) and imgs[0].dtype == np.uint8
    assert masks[0].shape == (40, 56) and set(np.unique(np.concatenate(masks))) == {0, 1}
    fg = [m.mean() for m in masks]
    assert min(fg) < 0.06 < 0.12 < max(fg)  # polyp size varies
    # Polyp-vs-mucosa contrast varies, with some barely visible polyps.
    contrast = [abs(i[m == 1].mean() - i[m == 0].mean()) for i, m in zip(imgs, masks) if m.any()]
    assert min(contrast) < 10 and max(contrast) > min(contrast) + 5


def test_asoct_sample_has_cornea_and_iris():
    img, m = synthetic_sample("asoct", 0, 0, (64, 80))
    assert img.shape == (64, 80) and img.dtype == np.uint8
    assert set(np.unique(m)) == {0, 1, 2}
    # The cornea arches above the iris.
    ys1, ys2 = np.nonzero(m == 1)[0], np.nonzero(m == 2)[0]
    assert ys1.min() < ys2.min()


def test_synthetic_sample_deterministic_and_index_stable():
    a = synthetic_sample("polyp", 5, 7, (32, 32))
    b = synthetic_sample("polyp", 5, 7, (32, 32))
    c = synthetic_sample("polyp", 6, 7, (32, 32))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_synthetic_dataset_deterministic(tmp_path):
    kw = dict(n_train=10, n_val=2, n_test=2, size=32, seed=3, workers=1)
    p1 = make_synthetic_hybrid(tmp_path / "a", **kw)
    p2 = make_synthetic_hybrid(tmp_path / "b", **kw)
    assert p1.read_text() == p2.read_text()
    for r1, r2 in zip(load_manifest(p1).records, load_manifest(p2).records):
        for col in ("image", "mask", "true_mask"):
            assert open(r1[col], "rb").read() == open(r2[col], "rb").read()
    p3 = make_synthetic_hybrid(tmp_path / "c", **{**kw, "seed": 4})
    assert p3.read_text() != p1.read_text()


def test_parallel_writer_matches_serial(tmp_path):
    kw = dict(n_train=20, n_val=0, n_test=0, size=24, seed=2)
    p1 = make_synthetic_hybrid(tmp_path / "a", workers=1, **kw)
    p2 = make_synthetic_hybrid(tmp_path / "b", workers=2, **kw)
    assert p1.read_text() == p2.read_text()


def test_hybrid_manifest_contents(tmp_path):
    path = make_synthetic_hybrid(tmp_path, n_train=20, n_val=3, n_test=4, size=32, strong_fraction=0.1,
                                 drop_fraction=0.4, seed=0, workers=1)
    man = load_manifest(path)
    train = [r for r in man.records if r["split"] == "train"]
    weak = [r for r in train if r["kind"] == "weak"]
    assert sum(r["kind"] == "strong" for r in train) == 2
    assert sum(r["weak_type"] == "drop" for r in weak) == round(0.4 * 18)
    assert all(r["kind"] == "strong" for r in man.records if r["split"] != "train")
    assert all(r["true_mask"] for r in man.records)
    # Recorded quality is the weak mask's IoU/Dice against the true mask.
    for r in weak:
        iou, dice = weak_quality(read_mask(r["mask"]), read_mask(r["true_mask"]))
        assert r["quality_iou"] == pytest.approx(iou, abs=1e-5)
        assert r["quality_dice"] == pytest.approx(dice, abs=1e-5)
        assert (r["weak_type"] == "drop") == (iou == 0.0 and read_mask(r["true_mask"]).any())
        assert math.isnan(r["severity"]) == (r["weak_type"] == "drop")
    assert all(math.isnan(r["quality_iou"]) for r in man.records if r["kind"] == "strong")
    assert man.meta["num_classes"] == 2 and man.meta["class_names"] == ["background", "polyp"]


def test_make_synthetic_dataset_splits_and_fully_annotated(tmp_path):
    path = make_synthetic_dataset(tmp_path, kind="asoct", n=10, size=32, splits=(0.6, 0.2, 0.2), weak=None, workers=1)
    man = load_manifest(path)
    assert [r["split"] for r in man.records].count("train") == 6
    assert all(r["kind"] == "strong" for r in man.records)
    assert man.num_classes == 3


def test_asoct_default_weak_is_scribble(tmp_path):
    path = make_synthetic_hybrid(tmp_path, kind="asoct", n_train=6, n_val=0, n_test=0, size=32, strong_count=1,
                                 workers=1)
    weak = [r for r in load_manifest(path).records if r["kind"] == "weak"]
    assert {r["weak_type"] for r in weak} == {"scribble"}
    assert (read_mask(weak[0]["mask"]) == 255).mean() > 0.5


@pytest.mark.parametrize(
    "kind, lo_min, hi_max",
    [("ellipse", 0.8, 0.65), ("box", 0.65, 0.6), ("scribble", 0.99, 0.9)],
)
def test_severity_controls_true_iou(polyp_masks, kind, lo_min, hi_max):
    means = []
    for sev in (0.0, 0.5, 1.0):
        q = [weak_quality(simulate(m, kind, sev, np.random.default_rng(i)), m)[0] for i, m in enumerate(polyp_masks)]
        means.append(np.mean(q))
    assert means[0] > lo_min
    assert means[2] < hi_max
    assert means[0] > means[1] > means[2]


def test_drop_and_quality_conventions():
    m = np.zeros((16, 16), np.uint8)
    m[4:10, 4:10] = 1
    m[0, 0] = 255
    d = simulate(m, "drop", 0.7, np.random.default_rng(0))
    assert set(np.unique(d)) == {0, 255} and d[0, 0] == 255
    assert weak_quality(d, m) == (0.0, 0.0)
    assert weak_quality(np.zeros_like(m), np.zeros_like(m)) == (1.0, 1.0)
    # Ignored pixels of the weak mask do not count.
    w = np.full_like(m, 255)
    w[5, 5] = 1
    w[15, 15] = 0
    assert weak_quality(w, m) == (1.0, 1.0)


def test_scribble_labels_every_class_and_ignores_the_rest():
    _, m = synthetic_sample("asoct", 1, 0, (64, 64))
    w = simulate(m, "scribble", 0.0, np.random.default_rng(0))
    assert set(np.unique(w)) == {0, 1, 2, 255}
    lab = w != 255
    assert lab.mean() < 0.3
    assert np.array_equal(w[lab], m[lab])  # severity 0: strokes stay inside their region


def test_ellipse_fit_recovers_an_ellipse():
    yy, xx = np.mgrid[:80, :80]
    obj = ((xx - 40) / 20.0) ** 2 + ((yy - 35) / 10.0) ** 2 <= 1
    cy, cx, a, b, _ = fit_ellipse(obj)
    assert (cy, cx) == pytest.approx((35, 40), abs=0.5)
    assert (a, b) == pytest.approx((20, 10), rel=0.06)
    w = simulate(obj.astype(np.uint8), "ellipse", 0.0, np.random.default_rng(0))
    assert weak_quality(w, obj.astype(np.uint8))[0] > 0.95


def test_weak_spec_plan_and_parsing():
    spec = WeakSpec("ellipse:0.5,box:0.5", "beta:2,5", drop_fraction=0.25)
    plan = spec.plan(40, np.random.default_rng(0))
    assert sum(t == "drop" for t, _ in plan) == 10
    assert {t for t, _ in plan} == {"ellipse", "box", "drop"}
    sev = [s for t, s in plan if t != "drop"]
    assert all(0 <= s <= 1 for s in sev)
    assert plan == spec.plan(40, np.random.default_rng(0))
    assert parse_mixture("scribble") == {"scribble": 1.0}
    assert parse_severity("0.3")(None) == 0.3
    with pytest.raises(ValueError, match="unknown simulator"):
        parse_mixture("ellipse,lasso")
    with pytest.raises(ValueError, match="severity"):
        parse_severity("gauss:1")


def test_use_true_masks_loads_exact_masks(tmp_path):
    path = make_synthetic_hybrid(tmp_path, n_train=6, n_val=0, n_test=0, size=32, strong_count=1, seed=0,
                                 drop_fraction=0.5, workers=1)
    weak_ds = HybridDataset(path, kinds="weak")
    true_ds = HybridDataset(path, kinds="weak", use_true_masks=True)
    for i in range(len(weak_ds)):
        exact = read_mask(weak_ds.records[i]["true_mask"])
        assert np.array_equal(true_ds[i]["mask"].numpy(), exact)
        assert true_ds[i]["kind"] == 1 and true_ds[i]["weak_index"] == i
    assert any(not np.array_equal(weak_ds[i]["mask"], true_ds[i]["mask"]) for i in range(len(weak_ds)))


def test_faint_share_changes_only_the_polyps_contrast():
    # data.synthetic_faint: the same frames and masks, only the polyps' colour change differs
    from hybrid_accel.data.synthetic import polyp_sample

    contrast = []
    for faint in (0.0, 1.0):
        imgs, masks = zip(*(synthetic_sample("polyp", 2, i, (48, 48), faint=faint) for i in range(8)))
        contrast.append(imgs)
        if faint == 0.0:
            masks0 = masks
        else:
            assert all(np.array_equal(a, b) for a, b in zip(masks0, masks))

    def polyp_gap(img, m):  # mean colour distance between polyp and the rest
        m = m.astype(bool)
        if not m.any() or m.all():
            return np.nan
        return float(np.abs(img[m].mean(0) - img[~m].mean(0)).sum())

    clear = np.nanmean([polyp_gap(i, m) for i, m in zip(contrast[0], masks0)])
    faint = np.nanmean([polyp_gap(i, m) for i, m in zip(contrast[1], masks0)])
    assert clear > faint
    with pytest.raises(ValueError, match="faint"):
        synthetic_sample("polyp", 0, 0, (16, 16), faint=1.5)
    assert polyp_sample(np.random.default_rng(0), (16, 16))[0].shape == (16, 16, 3)


def test_boundary_band_ignores_the_outline_of_each_object():
    from hybrid_accel.data.weak import ignore_boundary_band

    yy, xx = np.mgrid[:64, :80]
    big = (yy - 30) ** 2 + (xx - 25) ** 2 <= 15**2  # radius 15: band of round(0.2 * 15) = 3 px each side
    small = (yy - 30) ** 2 + (xx - 65) ** 2 <= 5**2  # radius 5: band of 1 px
    m = np.zeros((64, 80), np.int64)
    m[big], m[small] = 1, 2
    m[0, :3] = 255
    out = ignore_boundary_band(m, 0.2)
    r = np.hypot(yy - 30, xx - 25)
    assert out is not m and m[30, 25] == 1  # the input is left alone
    assert (out[r <= 11] == 1).all() and (out[(r >= 13) & (r <= 17)] == 255).all()
    assert (out[(r >= 19) & (xx < 50)] == 0).sum() == ((r >= 19) & (xx < 50)).sum() - 3  # but the ignored corner
    rs = np.hypot(yy - 30, xx - 65)
    assert (out[rs <= 3] == 2).all() and (out[(rs >= 4.5) & (rs <= 5.5)] == 255).all() and (out[rs >= 7] != 2).all()
    assert (out[0, :3] == 255).all()
    # scale-free: the ignored share of a disc does not depend on its size
    share = []
    for R in (10, 20, 40):
        yy, xx = np.mgrid[: 4 * R, : 4 * R]
        d = ((yy - 2 * R) ** 2 + (xx - 2 * R) ** 2 <= R**2).astype(np.int64)
        share.append((ignore_boundary_band(d, 0.3)[d == 1] == 255).mean())
    assert max(share) - min(share) < 0.06 and 0.4 < share[0] < 0.6  # 1 - 0.7^2 = 0.51 of the disc
    # a dropped annotation (no foreground) and width 0 come back unchanged
    empty = np.zeros((16, 16), np.int64)
    assert np.array_equal(ignore_boundary_band(empty, 0.3), empty)
    assert ignore_boundary_band(m, 0.0) is m
    with pytest.raises(ValueError, match="width"):
        ignore_boundary_band(m, -0.1)


def test_dataset_bands_only_weak_masks(tmp_path):
    from hybrid_accel.data.weak import ignore_boundary_band

    path = make_synthetic_hybrid(tmp_path, n_train=10, n_val=0, n_test=0, size=48, strong_count=3, seed=0,
                                 drop_fraction=0.3, workers=1)
    plain = HybridDataset(path, augment=False)
    band = HybridDataset(path, augment=False, weak_boundary_band=0.3)
    truth = HybridDataset(path, augment=False, weak_boundary_band=0.3, use_true_masks=True)
    assert "band" not in plain[0]
    changed = 0
    for i in range(len(plain)):
        it, raw = band[i], plain[i]["mask"]
        assert torch.equal(it["mask"], raw)  # the mask stays whole; the band comes beside it
        assert it["band"].dtype == torch.bool and it["band"].shape == raw.shape
        if plain.kinds[i] == 0 or not (raw == 1).any():  # strong, or a dropped weak mask: no band
            assert not it["band"].any()
        else:
            expect = torch.from_numpy(ignore_boundary_band(raw.numpy(), 0.3) == 255) & (raw != 255)
            assert torch.equal(it["band"], expect) and it["band"].any()
            changed += 1
        assert not truth[i]["band"].any()  # true masks are exact: nothing to band
    assert changed >= 3
    with pytest.raises(ValueError, match="weak_boundary_band"):
        HybridDataset(path, weak_boundary_band=-1)
