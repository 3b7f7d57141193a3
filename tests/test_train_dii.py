"""DII in a short CPU run: gamma rises for weak images whose labels equal the truth and falls for
images whose labels are inverted."""

import numpy as np
import pytest

from hybrid_accel import train as trainer
from hybrid_accel.config import load_config
from conftest import SCRATCH



pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _clean_and_inverted(root):
    """Rewrite the weak masks: even weak ranks get the exact mask, odd ones its inversion."""
    from hybrid_accel.data import load_manifest, read_mask, write_mask

    man = load_manifest(root)
    weak = [r for r in man.records if r["split"] == "train" and r["kind"] == "weak"]
    clean = []
    for k, r in enumerate(weak):
        true = read_mask(r["true_mask"]).astype(np.int64)
        write_mask(r["mask"], true if k % 2 == 0 else np.where(true == 255, 255, 1 - true))
        clean.append(k % 2 == 0)
    return np.array(clean)


@pytest.mark.parametrize("extra", [[], ["dii.normalize=area", "dii.optimizer=median_sgd", "dii.init=0.5"]], ids=["paper", "area"])
def test_gamma_separates_clean_from_inverted_labels(tmp_path, extra):
    from hybrid_accel.data import make_synthetic_hybrid

    root = tmp_path / "data"
    make_synthetic_hybrid(root, "polyp", n_train=20, n_val=2, n_test=2, size=32, strong_count=4, seed=3, workers=1)
    clean = _clean_and_inverted(root)
    cfg = load_config(None, [
        f"data.root={root}", f"out_dir={tmp_path}", "name=inv", "model.backbone=resnet10t", *SCRATCH,
        "model.decoder_channels=16", "model.aspp_rates=[1,2,3]", "data.image_size=32", "train.batch_size=4",
        "log.tracking=none", "log.progress=false", "eval.every=0", "eval.overlays=0", "method.dcr=false",
        "train.steps=9", "dii.tau=3", "data.check=false", "optim.lr=0.01", *extra,
    ])
    gamma = trainer.train(cfg)["gamma"].numpy()
    assert gamma.shape == (16,)
    good, bad = gamma[clean], gamma[~clean]
    assert good.mean() > 0.6 and bad.mean() < 0.4, (good, bad)
    assert (good > 0.5).sum() >= 7 and (bad < 0.5).sum() >= 7, (good, bad)
