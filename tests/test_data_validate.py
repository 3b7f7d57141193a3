"""Dataset validation: every error names its file and problem, one test per kind of error."""

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from hybrid_accel.data import DatasetError, load_manifest, make_synthetic_hybrid, validate_dataset, write_mask
from hybrid_accel.data.__main__ import main as cli


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    make_synthetic_hybrid(root, n_train=8, n_val=2, n_test=2, size=32, strong_count=2, seed=1, workers=1)
    return root


@pytest.fixture
def ds(clean, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(clean, root)
    return root


def _rows(root):
    with (root / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(root, rows):
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _problem(root, **kw):
    with pytest.raises(DatasetError) as e:
        validate_dataset(root, workers=1, **kw)
    return str(e.value)


def test_clean_dataset_passes_with_summary(clean):
    s = validate_dataset(clean, workers=1)
    assert s["n_images"] == 12
    assert s["counts"]["train"] == {"strong": 2, "weak": 6}
    assert s["counts"]["val"] == {"strong": 2, "weak": 0}
    assert s["image_sizes"] == {"32x32": 12}
    assert abs(sum(s["class_frequencies"]["test"]["classes"]) - 1.0) < 1e-9
    assert set(s["weak_quality"]) <= {"ellipse", "drop"}
    assert s["warnings"] == []


def test_missing_file(ds):
    img = ds / _rows(ds)[3]["image"]
    img.unlink()
    msg = _problem(ds)
    assert str(img) in msg and "not found" in msg


def test_missing_mask_file(ds):
    m = ds / _rows(ds)[0]["mask"]
    m.unlink()
    msg = _problem(ds)
    assert str(m) in msg and "mask file not found" in msg


def test_corrupt_image(ds):
    img = ds / _rows(ds)[1]["image"]
    img.write_bytes(b"this is not an image at all")
    msg = _problem(ds)
    assert str(img) in msg and "unreadable or corrupt image" in msg


def test_truncated_image_caught_by_decoding(ds):
    img = ds / _rows(ds)[2]["image"]
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    msg = _problem(ds)
    assert str(img) in msg and "corrupt" in msg


def test_mask_size_mismatch(ds):
    m = ds / _rows(ds)[4]["mask"]
    write_mask(m, np.zeros((30, 32), np.uint8))
    msg = _problem(ds)
    assert str(m) in msg and "size 32x30 differs" in msg


def test_mask_values_out_of_range(ds):
    m = ds / _rows(ds)[5]["mask"]
    arr = np.zeros((32, 32), np.uint8)
    arr[0, 0] = 7
    write_mask(m, arr)
    msg = _problem(ds)
    assert str(m) in msg and "values 7 outside the classes 0..1" in msg


def test_colour_mask_rejected(ds):
    m = ds / _rows(ds)[5]["mask"]
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 1
    Image.fromarray(rgb).save(m)
    msg = _problem(ds)
    assert str(m) in msg and "colour" in msg


def test_empty_strong_split(ds):
    rows = _rows(ds)
    for r in rows:
        if r["split"] == "train":
            r["kind"] = "weak"
    _write_rows(ds, rows)
    msg = _problem(ds)
    assert "manifest.csv" in msg and "no strong" in msg
    # The weakly supervised baseline may allow it.
    validate_dataset(ds, require_strong=False, workers=1)


def test_duplicate_rows(ds):
    rows = _rows(ds)
    _write_rows(ds, rows + [dict(rows[2])])
    msg = _problem(ds)
    assert "duplicate row" in msg and rows[2]["image"] in msg and "line 4" in msg


def test_unknown_split(ds):
    rows = _rows(ds)
    rows[0]["split"] = "training"
    _write_rows(ds, rows)
    msg = _problem(ds)
    assert "manifest.csv line 2" in msg and "unknown split 'training'" in msg


def test_unknown_kind(ds):
    rows = _rows(ds)
    rows[1]["kind"] = "partial"
    _write_rows(ds, rows)
    msg = _problem(ds)
    assert "manifest.csv line 3" in msg and "unknown kind 'partial'" in msg


def test_missing_column_and_manifest(ds, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "kind"} for r in _rows(ds)]
    _write_rows(ds, rows)
    assert "lacks column(s) kind" in _problem(ds)
    assert "manifest not found" in _problem(tmp_path / "nowhere")


def test_all_problems_reported_together(ds):
    rows = _rows(ds)
    (ds / rows[0]["image"]).unlink()
    (ds / rows[1]["image"]).write_bytes(b"junk")
    with pytest.raises(DatasetError) as e:
        validate_dataset(ds, workers=1)
    assert len(e.value.problems) == 2


def test_binary_255_masks_warn_without_mapping(ds):
    # 0/255 masks read as background + ignore: valid values, but almost surely a mistake.
    rows = _rows(ds)
    for r in rows[:3]:
        if r["kind"] == "strong":
            m = ds / r["mask"]
            arr = np.zeros((32, 32), np.uint8)
            arr[8:20, 8:20] = 255
            write_mask(m, arr)
    s = validate_dataset(ds, workers=1)
    assert any("mask_mapping" in w for w in s["warnings"])


def test_check_command_exit_status(clean, ds, capsys):
    assert cli(["check", str(clean), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "image sizes" in out
    (ds / _rows(ds)[0]["image"]).unlink()
    assert cli(["check", str(ds), "--no-progress"]) == 1
    assert "image file not found" in capsys.readouterr().err


def test_load_manifest_resolves_paths(clean):
    man = load_manifest(clean)
    assert man.num_classes == 2 and man.ignore_index == 255
    r = man.records[0]
    assert r["image"].startswith(str(clean)) and r["row"] == 2
