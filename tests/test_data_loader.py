"""HybridDataset contract, joint transforms, DataLoader use, round trips and the synth command."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hybrid_accel.data import (
    COLUMNS,
    AugmentConfig,
    HybridDataset,
    load_manifest,
    make_synthetic_hybrid,
    read_image,
    read_mask,
    write_manifest,
    write_mask,
)
from hybrid_accel.data.__main__ import main as cli
from hybrid_accel.data.transforms import IMAGENET_MEAN, IMAGENET_STD, warp_pair


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    root = tmp_path_factory.mktemp("hyb")
    make_synthetic_hybrid(root, n_train=12, n_val=3, n_test=3, size=(32, 40), strong_count=3, seed=0, workers=1)
    return root


def test_item_contract(hybrid):
    ds = HybridDataset(hybrid, split="train")
    assert len(ds) == 12 and ds.num_classes == 2 and ds.ignore_index == 255
    assert ds.kinds.dtype == np.int64 and ds.kinds.tolist().count(0) == 3
    assert np.array_equal(ds.strong_indices, np.flatnonzero(ds.kinds == 0))
    assert np.array_equal(ds.weak_indices, np.flatnonzero(ds.kinds == 1))
    assert len(ds.records) == len(ds.image_paths) == 12 and ds.root == hybrid
    for i in range(len(ds)):
        it = ds[i]
        assert set(it) == {"image", "mask", "index", "kind", "weak_index", "quality"}
        assert it["image"].dtype == torch.float32 and it["image"].shape == (3, 32, 40)
        assert it["mask"].dtype == torch.int64 and it["mask"].shape == (32, 40)
        assert it["index"] == i and it["kind"] == ds.kinds[i]
        if it["kind"] == 0:
            assert it["weak_index"] == -1 and math.isnan(it["quality"])
        else:
            assert ds.weak_indices[it["weak_index"]] == i
            assert it["quality"] == pytest.approx(ds.records[i]["quality_iou"])


def test_round_trip_without_augmentation(hybrid):
    ds = HybridDataset(hybrid, split="test")
    it = ds[1]
    img = read_image(ds.image_paths[1]).astype(np.float32) / 255.0
    expect = (img - IMAGENET_MEAN) / IMAGENET_STD
    assert np.allclose(it["image"].permute(1, 2, 0).numpy(), expect, atol=1e-5)
    assert np.array_equal(it["mask"].numpy(), read_mask(ds.records[1]["mask"]))


def test_kinds_filter_and_splits(hybrid):
    strong = HybridDataset(hybrid, kinds=("strong",))
    assert len(strong) == 3 and strong.n_weak == 0 and strong.kinds.sum() == 0
    weak = HybridDataset(hybrid, kinds="weak")
    assert len(weak) == 9 and weak[4]["weak_index"] == 4
    assert len(HybridDataset(hybrid, split="val")) == 3
    with pytest.raises(ValueError, match="split"):
        HybridDataset(hybrid, split="dev")


def test_resize_and_ignore_remap(hybrid):
    ds = HybridDataset(hybrid, kinds="weak", image_size=16, ignore_index=-100, use_true_masks=False)
    it = ds[0]
    assert it["image"].shape == (3, 16, 16) and it["mask"].shape == (16, 16)
    # Scribbles and padding use the requested ignore value.
    aug = HybridDataset(hybrid, kinds="strong", image_size=24, augment=AugmentConfig(scale=(0.5, 0.6), rotate=30),
                        ignore_index=-100)
    torch.manual_seed(0)
    vals = set(torch.cat([aug[i]["mask"].flatten() for i in range(3)]).tolist())
    assert vals <= {0, 1, -100} and -100 in vals


def test_augmentation_joint_valid_and_seeded(hybrid):
    ds = HybridDataset(hybrid, split="train", image_size=(32, 32), augment=True)
    torch.manual_seed(1)
    a = [ds[i] for i in range(4)]
    torch.manual_seed(1)
    b = [ds[i] for i in range(4)]
    c = [ds[i] for i in range(4)]
    for x, y, z in zip(a, b, c):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert any(not torch.equal(x["image"], z["image"]) for x, z in zip(a, c))
    for x in a:
        assert set(x["mask"].unique().tolist()) <= {0, 1, 255}
        assert torch.isfinite(x["image"]).all()


def test_warp_aligns_image_and_mask():
    """Warped image and mask stay aligned: warp a mask-shaped image and compare with the warped mask."""
    m = np.zeros((40, 60), np.uint8)
    m[10:25, 20:45] = 1
    img = np.repeat((m * 255)[..., None], 3, axis=2)
    wi, wm = warp_pair(img, m, (48, 48), zoom=1.3, angle=20.0, shift=(3.0, -2.0))
    agree = ((wi[..., 0] > 127) == (wm == 1))[wm != 255]
    assert agree.mean() > 0.97
    # Identity parameters on the affine path reproduce a plain resize (sizes chosen so that
    # nearest-neighbour sampling has no exact ties, which the two paths break differently).
    for size in ((37, 53), (80, 120)):
        _, plain = warp_pair(img, m, size)
        _, affine = warp_pair(img, m, size, zoom=1.0 + 1e-9)
        assert np.array_equal(plain, affine)


def test_dataloader_with_workers(hybrid):
    ds = HybridDataset(hybrid, split="train", image_size=32, augment=True)
    dl = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in dl:
        assert batch["image"].shape[1:] == (3, 32, 32) and batch["mask"].dtype == torch.int64
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(ds)))


def test_manifest_and_mask_round_trip(tmp_path):
    write_mask(tmp_path / "m.png", np.array([[0, 1], [2, 255]], np.uint8))
    assert read_mask(tmp_path / "m.png").tolist() == [[0, 1], [2, 255]]
    rec = {"image": tmp_path / "a.png", "mask": tmp_path / "m.png", "split": "val", "kind": "weak", "group": "p1",
           "true_mask": "/elsewhere/t.png", "quality_iou": 0.25, "quality_dice": 0.4, "weak_type": "box",
           "severity": float("nan")}
    path = write_manifest(tmp_path, [rec])
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert "a.png,m.png,val,weak,p1,/elsewhere/t.png,0.25,0.4,box," in path.read_text()
    (r,) = load_manifest(path).records
    assert r["image"] == str(tmp_path / "a.png") and r["true_mask"] == "/elsewhere/t.png"
    assert r["quality_iou"] == 0.25 and math.isnan(r["severity"]) and r["group"] == "p1"


def test_synth_command(tmp_path, capsys):
    out = tmp_path / "s"
    for sub in ("synth", "prepare", "check"):
        with pytest.raises(SystemExit) as e:
            cli([sub, "--help"])
        assert e.value.code == 0
    capsys.readouterr()
    rc = cli(["synth", "--out", str(out), "--kind", "asoct", "--n-train", "6", "--n-val", "1", "--n-test", "1",
              "--size", "24x32", "--strong-count", "2", "--no-progress"])
    assert rc == 0
    assert "class pixel fractions" in capsys.readouterr().out
    ds = HybridDataset(out)
    assert ds.num_classes == 3 and ds.n_strong == 2 and ds[0]["image"].shape == (3, 24, 32)
    assert cli(["synth", "--out", str(out), "--weak", "lasso", "--no-progress"]) == 2


def test_jitter_matrix_matches_sequential_jitter():
    from hybrid_accel.data.transforms import jitter_matrix, to_tensors

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(8, 10, 3), dtype=np.uint8)
    x = img.astype(np.float64) / 255.0
    luma = np.array([0.299, 0.587, 0.114])
    b, c, s = 1.15, 0.8, 1.2
    y = x * b  # brightness
    mu = (y @ luma).mean()
    y = (y - mu) * c + mu  # contrast about the mean grey
    g = (y @ luma)[..., None]
    y = np.clip((y - g) * s + g, 0, 1)  # saturation about each pixel's grey, then one clip
    expect = (y - IMAGENET_MEAN) / IMAGENET_STD
    got, _ = to_tensors(img, np.zeros((8, 10), np.uint8), jitter_matrix(x.reshape(-1, 3).mean(0), b, c, s))
    assert np.allclose(got.permute(1, 2, 0).numpy(), expect, atol=1e-5)
    assert got.is_contiguous()
