"""The trainer keeps one gamma snapshot per DII update (``<run>/gamma_history.npz``), also across a resume."""

import csv

import numpy as np
import pytest

from hybrid_accel import train as trainer
from hybrid_accel.config import load_config
from conftest import SCRATCH


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _cfg(root, out, *extra):
    return load_config(None, [
        f"data.root={root}", f"out_dir={out}", "name=gh", "model.backbone=resnet10t", *SCRATCH, "model.decoder_channels=8",
        "model.aspp_rates=[1,2,3]", "data.image_size=32", "train.batch_size=4", "log.tracking=none",
        "log.progress=false", "eval.every=0", "eval.overlays=0", "method.dcr=false", "train.steps=6", "dii.tau=2",
        "data.check=false", "checkpoint.every=2", *extra,
    ])


def test_gamma_history_one_row_per_update_and_resume(tmp_path):
    from hybrid_accel.data import make_synthetic_hybrid

    root = tmp_path / "data"
    make_synthetic_hybrid(root, "polyp", n_train=12, n_val=2, n_test=2, size=32, strong_count=4, seed=1, workers=1)
    res = trainer.train(_cfg(root, tmp_path / "a"))
    with np.load(tmp_path / "a" / "gh" / "gamma_history.npz") as f:
        steps, hist = f["step"], f["gamma"]
    assert steps.tolist() == [2, 4, 6] and hist.shape == (3, 8)
    np.testing.assert_allclose(hist[-1], res["gamma"].numpy())
    with open(tmp_path / "a" / "gh" / "gamma.csv") as f:
        final = [float(r["gamma"]) for r in csv.DictReader(f)]
    np.testing.assert_allclose(hist[-1], final, atol=1e-6)

    # stopped right after the step-6 update (last checkpoint: step 4), then resumed: the step-6 row is redone, once
    trainer.train(_cfg(root, tmp_path / "b", "debug.stop_after=6"))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    trainer.train(_cfg(root, tmp_path / "b", "resume=latest"))
    with np.load(tmp_path / "b" / "gh" / "gamma_history.npz") as f:
        assert f["step"].tolist() == [2, 4, 6]
        np.testing.assert_allclose(f["gamma"], hist, atol=1e-6)


def test_gamma_history_scores_replay_to_the_recorded_gamma(tmp_path):
    """The recorded scores are the ones that moved gamma: replaying them through a fresh GammaState
    gives every recorded snapshot; with a subset scan, unscanned images are NaN and keep their gamma."""
    import torch

    from hybrid_accel.data import make_synthetic_hybrid
    from hybrid_accel.dii import GammaState

    root = tmp_path / "data"
    make_synthetic_hybrid(root, "polyp", n_train=12, n_val=2, n_test=2, size=32, strong_count=4, seed=1, workers=1)
    for name, extra, n_scanned in (("all", [], 8), ("subset", ["dii.scan=subset", "dii.scan_size=3"], 3)):
        cfg = _cfg(root, tmp_path / name, "dii.init=0.5", *extra)
        trainer.train(cfg)
        with np.load(tmp_path / name / "gh" / "gamma_history.npz") as f:
            hist, score = f["gamma"], f["score"]
        assert score.shape == hist.shape == (3, 8)
        assert (np.isfinite(score).sum(1) == n_scanned).all()
        assert np.abs(score[np.isfinite(score)]).max() > 0
        g = GammaState(8, cfg.dii.init, cfg.dii.lr, cfg.dii.betas, cfg.dii.eps, cfg.dii.clip)
        for row, s in zip(hist, score):
            ranks = np.flatnonzero(np.isfinite(s))
            before = g.gamma.clone()
            g.step(torch.as_tensor(ranks), -torch.as_tensor(s[ranks]))
            np.testing.assert_allclose(g.gamma.numpy(), row, atol=1e-6)
            unscanned = np.flatnonzero(~np.isfinite(s))
            np.testing.assert_array_equal(g.gamma.numpy()[unscanned], before.numpy()[unscanned])
