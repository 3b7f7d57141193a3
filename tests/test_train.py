"""The trainer in-process on a tiny synthetic set: exact resume, NaN stop, config errors, baselines."""

import json
import os

import pytest
import torch

from hybrid_accel import checkpoint as ckpt
from hybrid_accel import train as trainer
from hybrid_accel.config import load_config
from conftest import SCRATCH

os.environ.setdefault("WANDB_MODE", "disabled")

# tiny and fast: a 4-block ResNet at 32 px with a 16-channel decoder
FAST = [
    "model.backbone=resnet10t", *SCRATCH, "model.decoder_channels=16", "model.aspp_rates=[1,2,3]", "data.image_size=32",
    "train.batch_size=4", "log.tracking=none", "log.progress=false", "eval.overlays=0", "dii.scan_batch_size=16",
    "eval.batch_size=8", "log.every=2", "dii.strong_batches=0",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from hybrid_accel.data import make_synthetic_hybrid

    root = tmp_path_factory.mktemp("tiny")
    make_synthetic_hybrid(root, "polyp", n_train=20, n_val=4, n_test=4, size=32, strong_count=4, seed=0, workers=1)
    return root


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _cfg(data, out, *extra):
    cfg = load_config(None, FAST + [f"data.root={data}", f"out_dir={out}", "name=t", *extra])
    return cfg


def _weights(run_dir):
    from safetensors.torch import load_file

    return {n: load_file(str(run_dir / "export" / f"{n}.safetensors")) for n in ("primary", "auxiliary")}


def test_exact_resume(tiny_data, tmp_path):
    common = ["train.steps=6", "dii.tau=2", "checkpoint.every=3", "eval.every=0", "eval.test_on=last",
              "data.augment=true"]
    full = trainer.train(_cfg(tiny_data, tmp_path / "a", *common))
    trainer.train(_cfg(tiny_data, tmp_path / "b", *common, "debug.stop_after=3"))
    run_b = tmp_path / "b" / "t"
    assert ckpt.latest_checkpoint(run_b).name == ckpt.step_name(3)
    resumed = trainer.train(_cfg(tiny_data, tmp_path / "b", *common, "resume=latest"))
    assert resumed["run_dir"] == str(run_b) and resumed["step"] == 6
    torch.testing.assert_close(full["gamma"], resumed["gamma"], rtol=0, atol=1e-6)
    assert not torch.allclose(full["gamma"], torch.full_like(full["gamma"], 0.5))  # gamma did move
    wa, wb = _weights(tmp_path / "a" / "t"), _weights(run_b)
    for net in wa:
        for k in wa[net]:
            torch.testing.assert_close(wa[net][k], wb[net][k], rtol=1e-5, atol=1e-6, msg=f"{net}.{k}")
    assert (run_b / "config.yaml").is_file() and (run_b / "gamma.csv").is_file()
    assert full["test"]["models"]["ensemble"]["mean_dice"] >= 0


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, capsys):
    argv = FAST + [f"data.root={tiny_data}", f"out_dir={tmp_path}", "name=nan", "train.steps=6",
                   "checkpoint.every=2", "eval.every=0", "dii.tau=2", "debug.nan_at_step=5"]
    assert trainer.main(argv) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 5" in err and "step_00000004" in err
    cks = [s for s, _ in ckpt.list_checkpoints(tmp_path / "nan")]
    assert cks == [4]
    assert not (tmp_path / "nan" / "export").exists()


def test_config_errors_fail_before_training(tiny_data, tmp_path, capsys):
    base = FAST + [f"data.root={tiny_data}", f"out_dir={tmp_path}"]
    assert trainer.main(base + ["name=e1", "train.batch_size=64"]) == 2
    assert "larger than the training set (20 images)" in capsys.readouterr().err
    assert trainer.main(base + ["name=e2", "dii.tau=0", "method.lambda_=-1"]) == 2
    err = capsys.readouterr().err
    assert "dii.tau=0" in err and "method.dcr_weight=-1" in err  # method.lambda_: the old name of the key
    assert trainer.main(base + ["name=e3", "bogus.key=1"]) == 2
    assert "unknown config key 'bogus.key'" in capsys.readouterr().err
    assert trainer.main(base + ["name=e4", "resume=latest"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    for name in ("e1", "e2", "e3", "e4"):
        assert not (tmp_path / name / ckpt.CKPT_DIR).exists()


def test_dii_without_weak_images(tmp_path, capsys):
    from hybrid_accel.data import make_synthetic_hybrid

    root = tmp_path / "allstrong"
    make_synthetic_hybrid(root, "polyp", n_train=8, n_val=2, n_test=2, size=32, weak=None, seed=1, workers=1)
    assert trainer.main(FAST + [f"data.root={root}", f"out_dir={tmp_path}", "name=x"]) == 2
    assert "method.dii needs weak images" in capsys.readouterr().err


def test_baseline_single_network_and_ablation_switches(tiny_data, tmp_path):
    # naive hybrid (one network) with KL switched off DCR: just must run, export one network
    r = trainer.train(_cfg(tiny_data, tmp_path, "method.dii=false", "method.dcr=false", "method.dii_sampling=false",
                           "train.steps=2", "eval.every=1", "checkpoint.every=0", "train.grad_accum=2"))
    assert set(r["test"]["models"]) == {"net"} and r["gamma"] is None
    assert (tmp_path / "t" / "export" / "net.safetensors").is_file()
    assert (tmp_path / "t" / ckpt.CKPT_DIR / "best").is_dir()
    r = trainer.train(_cfg(tiny_data, tmp_path, "name=abl", "method.paste=cutmix", "method.pseudo_loss=kl",
                           "dii.scan=subset", "dii.scan_size=5", "dii.tau=1", "train.steps=2", "eval.every=0",
                           "data.train_on=hybrid", "dii.strong_batches=1"))
    assert 5 <= int((r["gamma"] != 0.5).sum()) <= 10  # two updates of 5 scanned images each (may overlap)
    r = trainer.train(_cfg(tiny_data, tmp_path, "name=full", "data.train_on=full", "method.dii=false",
                           "method.dii_sampling=false", "train.steps=1", "eval.every=0"))
    assert r["step"] == 1


def test_boundary_band_and_peer_fill_train(tiny_data, tmp_path):
    # data.weak_boundary_band with method.band_fill=ignore / peer: the same run but for the band's targets
    common = ["method.strong_warmup=0", "method.lambda_warmup=0", "train.steps=3", "eval.every=0", "checkpoint.every=0",
              "data.weak_boundary_band=0.3", "dii.tau=1"]
    runs = {}
    for fill in ("ignore", "peer"):
        r = trainer.train(_cfg(tiny_data, tmp_path, f"name={fill}", f"method.band_fill={fill}", *common))
        assert r["step"] == 3 and r["gamma"] is not None
        runs[fill] = _weights(tmp_path / fill)
    a, b = runs["ignore"]["primary"], runs["peer"]["primary"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # one network: peer has no peer, the band is ignored
    r = trainer.train(_cfg(tiny_data, tmp_path, "name=one", "method.band_fill=peer", "method.dcr=false", *common))
    assert r["step"] == 3


def test_dump_records_samples(tiny_data, tmp_path):
    r = trainer.train(_cfg(tiny_data, tmp_path, "train.steps=2", "dii.tau=1", "eval.every=0", "debug.dump=true"))
    dump = json.loads((tmp_path / "t" / "debug" / "rank0.json").read_text())
    assert len(dump["samples"]["0"]) == 4 and len(dump["gamma_checksums"]) == 2
    assert dump["gamma"] == pytest.approx(r["gamma"].tolist())


def test_evaluate_loads_runs_and_checkpoints(tiny_data, tmp_path):
    from hybrid_accel.evaluate import load_models_for_eval

    trainer.train(_cfg(tiny_data, tmp_path, "train.steps=2", "dii.tau=1", "eval.every=0"))
    run = tmp_path / "t"
    models, config = load_models_for_eval(run)
    assert list(models) == ["primary", "auxiliary"] and config["image_size"] == [32, 32]
    ck_models, ck_config = load_models_for_eval(ckpt.latest_checkpoint(run))
    assert list(ck_models) == ["primary", "auxiliary"] and ck_config["num_classes"] == 2
    x = torch.randn(1, 3, 32, 32)
    for name in models:
        torch.testing.assert_close(models[name](x), ck_models[name](x))
    with pytest.raises(ValueError, match="cannot load"):
        load_models_for_eval(tmp_path / "nothing-here")


def test_strong_warmup_draws_every_image_when_fully_supervised(tiny_data, tmp_path):
    # data.train_on=full gives every train image its exact mask, so a strong warm-up (set in the
    # recommended config that every baseline starts from) must not shrink fully supervised to the strong
    # subset for its first steps; a hybrid run's warm-up still draws strong images only.
    from hybrid_accel.data import HybridDataset

    strong = set(HybridDataset(tiny_data, "train").strong_indices.tolist())
    common = ["train.steps=3", "method.strong_warmup=2", "eval.every=0", "eval.test_on=last", "debug.dump=true",
              "method.dii=false", "method.dcr=false", "method.dii_sampling=false"]
    trainer.train(_cfg(tiny_data, tmp_path / "full", *common, "data.train_on=full"))
    dump = json.loads((tmp_path / "full" / "t" / "debug" / "rank0.json").read_text())
    warm = set(dump["samples"]["0"]) | set(dump["samples"]["1"])
    assert warm - strong, "fully supervised warmed up on the strong images only"
    trainer.train(_cfg(tiny_data, tmp_path / "hyb", *common, "data.train_on=hybrid"))
    dump = json.loads((tmp_path / "hyb" / "t" / "debug" / "rank0.json").read_text())
    assert set(dump["samples"]["0"]) | set(dump["samples"]["1"]) <= strong


def test_strong_warmup_then_weak_images_with_a_gamma_update(tiny_data, tmp_path, capsys):
    # method.strong_warmup: the first steps draw strong images only (both samplers), then one gamma
    # update comes before any weak image is used; the run resumes exactly across the boundary.
    from hybrid_accel.data import HybridDataset

    strong = set(HybridDataset(tiny_data, "train").strong_indices.tolist())
    common = ["train.steps=5", "method.strong_warmup=2", "dii.tau=10", "dii.init=0.3", "eval.every=0",
              "checkpoint.every=1", "eval.test_on=last", "debug.dump=true", "method.lambda_warmup=2",
              "method.dcr_supervision=both", "optim.head_lr_mult=10", "dii.lr_schedule=poly", "dii.score=weight",
              "dii.networks=both"]
    full = trainer.train(_cfg(tiny_data, tmp_path / "a", *common))
    dump = json.loads((tmp_path / "a" / "t" / "debug" / "rank0.json").read_text())
    assert set(dump["samples"]["0"]) | set(dump["samples"]["1"]) <= strong
    assert list(dump["gamma_checksums"]) == ["2"]  # the update at the end of the warm-up; tau=10 gives none
    assert not set(dump["samples"]["2"]) <= strong or not set(dump["samples"]["3"]) <= strong
    assert (full["gamma"] != 0.3).all()
    assert "end of the strong warm-up" in capsys.readouterr().out
    trainer.train(_cfg(tiny_data, tmp_path / "b", *common, "debug.stop_after=1"))
    resumed = trainer.train(_cfg(tiny_data, tmp_path / "b", *common, "resume=latest"))
    torch.testing.assert_close(full["gamma"], resumed["gamma"], rtol=0, atol=1e-6)
    wa, wb = _weights(tmp_path / "a" / "t"), _weights(tmp_path / "b" / "t")
    for net in wa:
        for k in wa[net]:
            torch.testing.assert_close(wa[net][k], wb[net][k], rtol=1e-5, atol=1e-6, msg=f"{net}.{k}")
