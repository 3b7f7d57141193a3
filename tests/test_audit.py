"""The annotation audit on a tiny DII run whose weak masks are half exact, half inverted."""

import csv

import numpy as np
import pytest

from hybrid_accel import audit
from hybrid_accel.config import load_config
from conftest import SCRATCH, train_isolated


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from hybrid_accel.data import load_manifest, make_synthetic_hybrid, read_mask, write_mask

    tmp = tmp_path_factory.mktemp("audit")
    root = tmp / "data"
    make_synthetic_hybrid(root, "polyp", n_train=20, n_val=2, n_test=2, size=32, strong_count=4, seed=3, workers=1)
    # even weak ranks: the exact mask; odd ones: its inversion (the annotations to re-check)
    weak = [r for r in load_manifest(root).records if r["split"] == "train" and r["kind"] == "weak"]
    for k, r in enumerate(weak):
        true = read_mask(r["true_mask"]).astype(np.int64)
        write_mask(r["mask"], true if k % 2 == 0 else np.where(true == 255, 255, 1 - true))
    cfg = load_config(None, [
        f"data.root={root}", f"out_dir={tmp}", "name=inv", "model.backbone=resnet10t", *SCRATCH, "model.decoder_channels=16",
        "model.aspp_rates=[1,2,3]", "data.image_size=32", "train.batch_size=4", "log.tracking=none",
        "log.progress=false", "eval.every=0", "eval.overlays=0", "method.dcr=false", "method.dii_sampling=false",
        "train.steps=9", "dii.tau=3", "data.check=false", "optim.lr=0.01", "checkpoint.every=0",
    ])
    train_isolated(cfg)
    return tmp / "inv"


def test_audit_ranks_inverted_annotations_first(run_dir, capsys):
    out = run_dir / "audit-test"
    assert audit.main([str(run_dir), "--out", str(out), "--top", "4"]) == 0
    assert "16 weak images ranked by gamma" in capsys.readouterr().out
    with open(out / "audit.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and [int(r["rank"]) for r in rows] == list(range(16))
    gammas = [float(r["gamma"]) for r in rows]
    assert gammas == sorted(gammas)
    for r in rows:
        steps = [int(p.split(":")[0]) for p in r["gamma_history"].split()]
        assert steps == [3, 6, 9]
        assert float(r["gamma_history"].split()[-1].split(":")[1]) == pytest.approx(float(r["gamma"]), abs=1e-4)
        assert r["true_iou"] != "" and r["pred_weak_iou"] != ""
        assert r["image"].endswith(".jpg") and r["weak_mask"].endswith(".png")
    # the eight lowest-ranked are mostly the inverted (odd) annotations
    inverted_low = sum(int(r["weak_index"]) % 2 == 1 for r in rows[:8])
    assert inverted_low >= 7, [(r["weak_index"], r["gamma"]) for r in rows]
    # true_iou is the manifest's record (of the simulated ellipse, which this test overwrote)
    from hybrid_accel.data import load_manifest

    man = {r["image"]: r["quality_iou"] for r in load_manifest(run_dir.parent / "data").records}
    assert all(float(r["true_iou"]) == pytest.approx(man[r["image"]], abs=1e-4) for r in rows)
    html = (out / "index.html").read_text()
    for name in ("lowest.png", "highest.png", "gamma_hist.png", "index.html"):
        assert (out / name).is_file()
    assert html.count('<div class="card">') == 8 and "Spearman" in html
    shown = sorted((out / "instances").glob("weak_*.png"))
    assert len(shown) == 8 and all(f"instances/{p.name}" in html for p in shown)


def test_audit_without_model_and_bad_input(run_dir, tmp_path):
    assert audit.main([str(run_dir), "--out", str(tmp_path / "a"), "--no-predict", "--top", "2"]) == 0
    with open(tmp_path / "a" / "audit.csv", newline="") as f:
        assert all(r["pred_weak_iou"] == "" for r in csv.DictReader(f))
    assert audit.main([str(tmp_path / "nothing")]) == 2
