"""Hybrid datasets prepared from fully annotated folders: group splits, mask mapping, CVC-ClinicDB."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hybrid_accel.data import (
    DatasetError,
    HybridDataset,
    find_pairs,
    load_manifest,
    prepare_hybrid,
    read_mask,
    split_groups,
    validate_dataset,
    write_meta,
)
from hybrid_accel.data.__main__ import main as cli

CVC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cvc-clinicdb"


def _annotated_folder(root, n_groups=10, per_group=3, size=(24, 32), binary255=True, with_csv=True):
    """A CVC-like folder: images/N.jpg, masks/N.png (0/255), sequences.csv (frame,image,mask,sequence)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    n = 0
    for g in range(1, n_groups + 1):
        for _ in range(per_group):
            n += 1
            img = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "images" / f"{n}.jpg", quality=90)
            m = np.zeros(size, np.uint8)
            y, x = rng.integers(2, size[0] - 10), rng.integers(2, size[1] - 10)
            m[y : y + 8, x : x + 8] = 255 if binary255 else 1
            Image.fromarray(m).save(root / "masks" / f"{n}.png")
            rows.append({"frame": n, "image": f"images/{n}.jpg", "mask": f"masks/{n}.png", "sequence": g})
    if with_csv:
        with (root / "sequences.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


def _groups_by_split(records):
    out = {}
    for r in records:
        out.setdefault(r["group"], set()).add(r["split"])
    return out


def test_prepare_splits_by_group_and_maps_255(tmp_path):
    src = _annotated_folder(tmp_path / "src")
    path = prepare_hybrid(src, tmp_path / "out", strong_count=3, seed=0, workers=1)
    man = load_manifest(path)
    assert len(man.records) == 30
    assert all(len(s) == 1 for s in _groups_by_split(man.records).values())  # no group straddles
    n_groups = {s: len({r["group"] for r in man.records if r["split"] == s}) for s in ("train", "val", "test")}
    assert n_groups == {"train": 7, "val": 1, "test": 2}
    train = [r for r in man.records if r["split"] == "train"]
    assert sum(r["kind"] == "strong" for r in train) == 3
    assert all(r["kind"] == "strong" for r in man.records if r["split"] != "train")
    # 0/255 source masks are written as 0/1 class indices; images stay where they were.
    for r in man.records[:5]:
        assert set(np.unique(read_mask(r["true_mask"]))) == {0, 1}
        assert Path(r["image"]).parent == src / "images"
    assert man.meta["source"]["source_mask_mapping"] == {0: 0, 255: 1}
    assert man.num_classes == 2 and man.meta["mask_mapping"] is None
    validate_dataset(path, workers=1)


def test_prepare_deterministic_and_seed_dependent(tmp_path):
    src = _annotated_folder(tmp_path / "src")
    a = prepare_hybrid(src, tmp_path / "a", seed=1, workers=1).read_text()
    b = prepare_hybrid(src, tmp_path / "b", seed=1, workers=1).read_text()
    c = prepare_hybrid(src, tmp_path / "c", seed=2, workers=1).read_text()
    strip = lambda t, d: t.replace(str(tmp_path / d), "")  # noqa: E731
    assert strip(a, "a") == strip(b, "b")
    assert strip(a, "a") != strip(c, "c")


def test_prepare_from_folders_matched_by_stem_and_copy(tmp_path):
    src = _annotated_folder(tmp_path / "src", n_groups=8, per_group=1, with_csv=False)
    path = prepare_hybrid(src, tmp_path / "out", copy_images=True, seed=0, workers=1)
    man = load_manifest(path)
    assert len(man.records) == 8 and len({r["group"] for r in man.records}) == 8
    assert all(Path(r["image"]).parent == tmp_path / "out" / "images" for r in man.records)
    assert "images/" in path.read_text()  # copied images are referenced relatively


def test_prepare_explicit_mapping_and_limits(tmp_path):
    src = _annotated_folder(tmp_path / "src", binary255=False)
    path = prepare_hybrid(src, tmp_path / "out", mask_mapping=None, max_groups=5, max_per_group=2, seed=0,
                          workers=1)
    man = load_manifest(path)
    assert len(man.records) == 10 and {r["group"] for r in man.records} == {"1", "2", "3", "4", "5"}


def test_prepare_errors_name_the_problem(tmp_path):
    src = _annotated_folder(tmp_path / "src", n_groups=2)
    with pytest.raises(DatasetError, match="cannot be split"):
        prepare_hybrid(src, tmp_path / "out", workers=1)
    (src / "images" / "1.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1\.jpg: file not found"):
        prepare_hybrid(src, tmp_path / "out", val_fraction=0, test_fraction=0.5, workers=1)
    with pytest.raises(DatasetError, match="source folder not found"):
        find_pairs(tmp_path / "missing")


def test_split_groups_is_by_count_and_keeps_train():
    groups = [str(g) for g in range(20) for _ in range(3)]
    sp = split_groups(groups, 0.1, 0.2, seed=0)
    vals = list(sp.values())
    assert (vals.count("test"), vals.count("val"), vals.count("train")) == (4, 2, 14)
    assert sp == split_groups(list(reversed(groups)), 0.1, 0.2, seed=0)


def test_mask_mapping_in_dataset_yaml(tmp_path):
    """A dataset whose manifest lists raw 0/255 masks loads as 0/1 through dataset.yaml's mapping."""
    src = _annotated_folder(tmp_path, n_groups=3, per_group=1)
    rows = [{"image": f"images/{i}.jpg", "mask": f"masks/{i}.png", "split": "train", "kind": "strong"}
            for i in (1, 2, 3)]
    with (src / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "mask", "split", "kind"])
        w.writeheader()
        w.writerows(rows)
    write_meta(src, {"num_classes": 2, "ignore_index": 255, "mask_mapping": {0: 0, 255: 1}})
    ds = HybridDataset(src, image_size=(24, 32))
    assert set(ds[0]["mask"].unique().tolist()) == {0, 1}
    s = validate_dataset(src, workers=1)
    assert s["warnings"] == [] and s["mask_mapping"] == {0: 0, 255: 1}
    # Without the mapping the same masks read as background + ignore (and the check warns).
    s = validate_dataset(src, mask_mapping="identity", workers=1)
    assert any("0:0,255:1" in w for w in s["warnings"])
    assert set(HybridDataset(src, mask_mapping="identity")[0]["mask"].unique().tolist()) == {0, 255}


def test_prepare_command(tmp_path, capsys):
    src = _annotated_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert cli(["prepare", str(src), "--out", str(out), "--strong-count", "2", "--weak", "box", "--no-progress"]) == 0
    assert "weak masks, true IoU" in capsys.readouterr().out
    assert {r["weak_type"] for r in load_manifest(out).records if r["kind"] == "weak"} <= {"box", "drop"}
    assert cli(["prepare", str(tmp_path / "nope"), "--out", str(out), "--no-progress"]) == 1


def test_prepare_strong_by_group_takes_whole_groups(tmp_path):
    # 10 groups of 3 frames, train 7 groups: 4 strong frames by group means two whole groups (6 frames),
    # every frame of a group strong or none; by frame, 4 frames.
    src = _annotated_folder(tmp_path / "src")
    man = load_manifest(prepare_hybrid(src, tmp_path / "g", strong_count=4, strong_by="group", seed=0, workers=1))
    train = [r for r in man.records if r["split"] == "train"]
    kinds = {}
    for r in train:
        kinds.setdefault(r["group"], set()).add(r["kind"])
    assert all(len(k) == 1 for k in kinds.values())
    assert sorted(len(k) for k in kinds.values()) == [1] * 7
    strong_groups = [g for g, k in kinds.items() if k == {"strong"}]
    assert len(strong_groups) == 2 and sum(r["kind"] == "strong" for r in train) == 6
    again = load_manifest(prepare_hybrid(src, tmp_path / "g2", strong_count=4, strong_by="group", seed=0, workers=1))
    assert [(r["group"], r["kind"]) for r in again.records] == [(r["group"], r["kind"]) for r in man.records]
    other = load_manifest(prepare_hybrid(src, tmp_path / "g3", strong_count=4, strong_by="group", seed=1, workers=1))
    other_strong = {r["group"] for r in other.records if r["kind"] == "strong" and r["split"] == "train"}
    assert len(other_strong) == 2
    by_frame = load_manifest(prepare_hybrid(src, tmp_path / "f", strong_count=4, seed=0, workers=1))
    assert sum(r["kind"] == "strong" and r["split"] == "train" for r in by_frame.records) == 4
    none = load_manifest(prepare_hybrid(src, tmp_path / "z", strong_count=0, strong_by="group", seed=0, workers=1))
    assert not any(r["kind"] == "strong" for r in none.records if r["split"] == "train")


def test_prepare_strong_by_rejects_unknown_and_cli_passes_it(tmp_path, capsys):
    src = _annotated_folder(tmp_path / "src")
    with pytest.raises(ValueError, match="strong_by='sequence'.*frame, group"):
        prepare_hybrid(src, tmp_path / "bad", strong_by="sequence", workers=1)
    assert not (tmp_path / "bad").exists()  # rejected before anything is written
    out = tmp_path / "out"
    assert cli(["prepare", str(src), "--out", str(out), "--strong-count", "3", "--strong-by", "group",
                "--no-progress", "--no-check"]) == 0
    train = [r for r in load_manifest(out).records if r["split"] == "train"]
    assert sum(r["kind"] == "strong" for r in train) == 3  # one whole group of 3
    assert len({r["group"] for r in train if r["kind"] == "strong"}) == 1


@pytest.mark.skipif(not (CVC / "sequences.csv").exists(), reason="CVC-ClinicDB not present")
def test_prepare_cvc_strong_by_group_covers_few_sequences(tmp_path):
    # the reproduction preset's dataset: 10% of the train frames strong, as whole sequences
    path = prepare_hybrid(CVC, tmp_path / "cvc", strong_fraction=0.1, strong_by="group", seed=0, workers=2)
    train = [r for r in load_manifest(path).records if r["split"] == "train"]
    strong = [r for r in train if r["kind"] == "strong"]
    assert len(strong) >= round(0.1 * len(train))
    assert len({r["group"] for r in strong}) <= 3 < len({r["group"] for r in train})
    groups_strong = {r["group"] for r in strong}
    assert all(r["kind"] == "strong" for r in train if r["group"] in groups_strong)
    weak = [r for r in train if r["kind"] == "weak"]  # 40% of the weak images dropped, exactly
    assert sum(r["weak_type"] == "drop" for r in weak) == round(0.4 * len(weak))


@pytest.mark.skipif(not (CVC / "sequences.csv").exists(), reason="CVC-ClinicDB not present")
def test_prepare_cvc_clinicdb_subset(tmp_path):
    path = prepare_hybrid(CVC, tmp_path / "cvc", strong_count=2, max_groups=10, max_per_group=2, seed=0,
                          workers=1)
    man = load_manifest(path)
    assert len(man.records) == 20
    assert all(len(s) == 1 for s in _groups_by_split(man.records).values())
    assert {r["split"] for r in man.records} == {"train", "val", "test"}
    assert all(Path(r["image"]).is_absolute() and str(CVC) in r["image"] for r in man.records)
    s = validate_dataset(path, workers=1)
    assert s["image_sizes"] == {"384x288": 20}
    assert 0.0 < s["class_frequencies"]["train"]["classes"][1] < 0.5
    ds = HybridDataset(path, image_size=64, augment=True)
    item = ds[int(ds.weak_indices[0])]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (64, 64)
