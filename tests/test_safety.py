"""Bad input and attacks (docs/safety.md): each test is one row of the table there.

Files a user is handed (checkpoints, run folders) must never run code when loaded; damaged files
are named; user errors end in one line and exit code 2.
"""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hybrid_accel import checkpoint as ckpt
from hybrid_accel import train as trainer
from hybrid_accel.config import load_config
from conftest import SCRATCH, train_isolated

os.environ.setdefault("WANDB_MODE", "disabled")

FAST = [
    "model.backbone=resnet10t", *SCRATCH, "model.decoder_channels=16", "model.aspp_rates=[1,2,3]", "data.image_size=32",
    "train.batch_size=4", "log.tracking=none", "log.progress=false", "eval.overlays=0", "dii.scan_batch_size=16",
    "eval.batch_size=8", "log.every=1", "dii.strong_batches=0", "eval.every=0", "eval.test_on=last",
]


class _Plant:
    """Unpickling this object opens (so creates) the file ``path``: a stand-in for a shell command."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(path, marker, wrap=True):
    torch.save({"step": 1, "payload": _Plant(marker)} if wrap else _Plant(marker), path)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from hybrid_accel.data import make_synthetic_hybrid

    root = tmp_path_factory.mktemp("tiny")
    make_synthetic_hybrid(root, "polyp", n_train=12, n_val=2, n_test=2, size=32, strong_count=4, seed=0, workers=1)
    return root


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A DII + DCR run with checkpoints at steps 1 and 2 (and no gamma.csv: it stops early)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, FAST + [f"data.root={tiny_data}", f"out_dir={out}", "name=r", "train.steps=3",
                                    "dii.tau=1", "checkpoint.every=1", "checkpoint.keep_last=3",
                                    "debug.stop_after=2"])
    train_isolated(cfg)
    return out / "r"


@pytest.fixture
def run(trained, tmp_path, fresh_accelerate_state):
    """A private copy of the trained run (tests damage it)."""
    dst = tmp_path / "runs" / "r"
    shutil.copytree(trained, dst)
    return dst


def _argv(tiny_data, run, *extra):
    return FAST + [f"data.root={tiny_data}", f"out_dir={run.parent}", "name=r", "train.steps=3", "dii.tau=1",
                   "checkpoint.every=1", "checkpoint.keep_last=3", *extra]


def _to_legacy(folder, marker):
    """Make ``folder`` an old-format checkpoint whose trainer_state.pt plants ``marker`` when unpickled."""
    (folder / ckpt.TRAINER_STATE).unlink()
    (folder / ckpt.TRAINER_TENSORS).unlink()
    _plant(folder / ckpt.LEGACY_TRAINER_STATE, marker)


# ------------------------------------------------------------------------------ the format
def test_trainer_state_is_json_and_safetensors(trained):
    last = ckpt.latest_checkpoint(trained)
    assert last.name == ckpt.step_name(2)
    assert not list(last.glob("*.pt"))
    state = ckpt.read_trainer_state(last)
    assert state["step"] == 2 and state["net_names"] == ["primary", "auxiliary"]
    g = state["gamma"]
    assert isinstance(g["gamma"], torch.Tensor) and g["gamma"].numel() == 8 and isinstance(g["updates"], int)
    assert state["best"] == float("-inf")  # no validation yet: JSON keeps -inf


# --------------------------------------------------- 1: no code runs from a checkpoint folder
def test_old_pickle_trainer_state_not_run_by_evaluate(run, tiny_data, tmp_path, capsys):
    from hybrid_accel import evaluate

    marker = tmp_path / "pwned"
    ck = ckpt.latest_checkpoint(run)
    _to_legacy(ck, marker)
    assert evaluate.main(["--model", str(ck), "--data", str(tiny_data)]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert str(ck / "trainer_state.pt") in err and "hybrid_accel.checkpoint upgrade" in err


def test_old_pickle_trainer_state_not_run_by_resume(run, tiny_data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    for _, ck in ckpt.list_checkpoints(run):
        _to_legacy(ck, marker)
    ck = ckpt.latest_checkpoint(run)
    assert trainer.main(_argv(tiny_data, run, f"resume={ck}")) == 2
    assert "trainer_state.pt" in capsys.readouterr().err
    assert trainer.main(_argv(tiny_data, run, "resume=latest")) == 2
    err = capsys.readouterr().err
    assert "trainer_state.pt" in err and "upgrade" in err
    assert not marker.exists()


def test_old_pickle_trainer_state_not_run_by_audit(run, tmp_path, capsys):
    from hybrid_accel import audit

    marker = tmp_path / "pwned"
    assert not (run / "gamma.csv").exists()  # the audit falls back to the checkpoint's gamma
    _to_legacy(ckpt.latest_checkpoint(run), marker)
    assert audit.main([str(run), "--no-predict"]) == 2
    assert "trainer_state.pt" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "scheduler.bin"])
def test_malicious_accelerate_file_refused_on_resume(run, tiny_data, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    ck = ckpt.latest_checkpoint(run)
    _plant(ck / name, marker)
    assert trainer.main(_argv(tiny_data, run, f"resume={ck}")) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert str(ck / name) in err and "could run code" in err
    assert "step_00000001" in err  # the older, intact checkpoint is offered


def test_upgrade_converts_trusted_and_refuses_code(run, tmp_path, capsys):
    ck1, ck2 = (p for _, p in ckpt.list_checkpoints(run))
    want = ckpt.read_trainer_state(ck1)
    (ck1 / ckpt.TRAINER_STATE).unlink()
    (ck1 / ckpt.TRAINER_TENSORS).unlink()
    torch.save(want, ck1 / ckpt.LEGACY_TRAINER_STATE)  # what an older version wrote
    marker = tmp_path / "pwned"
    _to_legacy(ck2, marker)
    assert ckpt.main(["upgrade", str(run)]) == 2
    out, err = capsys.readouterr()
    assert not marker.exists() and str(ck2 / "trainer_state.pt") in err and "refused" in err
    got = ckpt.read_trainer_state(ck1)
    torch.testing.assert_close(got["gamma"]["gamma"], want["gamma"]["gamma"], rtol=0, atol=0)
    assert got["step"] == want["step"] and (ck1 / "trainer_state.pt.bak").is_file()


# ------------------------------------------------- 8: a truncated file in the newest checkpoint
def _truncate(f, keep=0.5):
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["model.safetensors", ckpt.TRAINER_STATE, "optimizer.bin"])
def test_truncated_newest_checkpoint_falls_back(run, tiny_data, capsys, name):
    ck1, ck2 = (p for _, p in ckpt.list_checkpoints(run))
    _truncate(ck2 / name)
    assert trainer.main(_argv(tiny_data, run, f"resume={ck2}")) == 2  # explicit: named, older one offered
    err = capsys.readouterr().err
    assert str(ck2 / name) in err and f"resume={ck1}" in err
    res = trainer.train(load_config(None, _argv(tiny_data, run, "resume=latest")))  # latest: takes the older one
    out = capsys.readouterr().out
    assert f"skipping checkpoint {ck2.name}" in out and str(ck2 / name) in out
    assert f"resumed from {ck1} at step 1" in out and res["step"] == 3


# ------------------------------------------ 7, 9: every check before the first step, nothing written
@pytest.mark.parametrize("bad, says", [
    (["eval.metric=mean_dcie"], "did you mean 'mean_dice'"),
    (["eval.metric=mean_assd"], "lower-is-better"),
    (["eval.model=primary", "method.dcr=false"], "the evaluated networks are net"),
    (["eval.model=net"], "the evaluated networks are ensemble, primary, auxiliary"),
])
def test_bad_eval_setting_fails_before_training(tiny_data, tmp_path, capsys, fresh_accelerate_state, bad, says):
    argv = FAST + [f"data.root={tiny_data}", f"out_dir={tmp_path}", "name=e", "train.steps=2", *bad]
    assert trainer.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and bad[0].split("=")[0] in err
    assert not (tmp_path / "e").exists()


def test_failed_data_check_leaves_no_run_folder(tiny_data, tmp_path, capsys, fresh_accelerate_state):
    from hybrid_accel.data import load_manifest

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    gone = load_manifest(data).records[0]["image"]
    os.remove(gone)
    argv = FAST + [f"data.root={data}", f"out_dir={tmp_path / 'runs'}", "name=d", "train.steps=2"]
    assert trainer.main(argv) == 2
    assert os.path.basename(gone) in capsys.readouterr().err
    assert not (tmp_path / "runs" / "d").exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_failed_resume_keeps_config_yaml(run, tiny_data, capsys):
    before = (run / "config.yaml").read_bytes()
    assert trainer.main(_argv(tiny_data, run, "resume=latest", "train.batch_size=64")) == 2
    assert "larger than the training set" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == before
    marker_ck = ckpt.latest_checkpoint(run)
    _truncate(marker_ck / "model_1.safetensors")
    assert trainer.main(_argv(tiny_data, run, f"resume={marker_ck}", "train.steps=5")) == 2
    assert "model_1.safetensors" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == before


# ------------------------------------------------------- 3, 4: prepare never overwrites data
def _source(root, n=10):
    """An annotated folder: images/N.png, masks/N.png (0/255), one group per image."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "images" / f"{k}.png")
        m = np.zeros((24, 24), np.uint8)
        m[4 + k % 8 : 12 + k % 8, 6:14] = 255
        Image.fromarray(m).save(root / "masks" / f"{k}.png")
    return root


def test_prepare_refuses_existing_output_without_overwrite(tmp_path, capsys):
    from hybrid_accel.data.__main__ import main as data_cli

    src, out = _source(tmp_path / "src"), tmp_path / "out"
    args = ["prepare", str(src), "--out", str(out), "--strong-count", "2", "--no-progress", "--no-check"]
    assert data_cli(args) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert data_cli(args + ["--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "manifest.csv" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / "masks" / "stale.png").write_bytes(b"x")
    assert data_cli(args + ["--seed", "5", "--overwrite"]) == 0
    assert (out / "manifest.csv").read_bytes() != before[out / "manifest.csv"]
    assert not (out / "masks" / "stale.png").exists()


@pytest.mark.parametrize("where", [".", "sub/out"])
def test_prepare_refuses_output_inside_source(tmp_path, capsys, where):
    from hybrid_accel.data.__main__ import main as data_cli

    src = _source(tmp_path / "src")
    listing = sorted(p.relative_to(src) for p in src.rglob("*"))
    assert data_cli(["prepare", str(src), "--out", str(src / where), "--no-progress"]) == 2
    assert "inside the source folder" in capsys.readouterr().err
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == listing


def test_prepare_refuses_hybrid_manifest_as_source_list(tmp_path, capsys):
    from hybrid_accel.data.__main__ import main as data_cli

    src = _source(tmp_path / "src")
    first = tmp_path / "first"
    assert data_cli(["prepare", str(src), "--out", str(first), "--strong-count", "2", "--no-progress",
                     "--no-check"]) == 0
    shutil.copy(first / "manifest.csv", src / "manifest.csv")  # what `prepare SRC --out SRC` used to leave
    out = tmp_path / "second"
    assert data_cli(["prepare", str(src), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(src / "manifest.csv") in err and "hybrid manifest" in err
    assert not out.exists()


def test_prepare_out_is_a_file(tmp_path, capsys):
    from hybrid_accel.data.__main__ import main as data_cli

    src = _source(tmp_path / "src")
    (tmp_path / "f").write_text("x")
    assert data_cli(["prepare", str(src), "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert data_cli(["prepare", str(src), "--out", str(tmp_path / "f" / "o"), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err


# ------------------------------------------------------ 2: a meta tensor mixed with CPU tensors
def _mixed_calls():
    from hybrid_accel import ops
    from hybrid_accel.dii import classifier_grad, dii_scores
    from hybrid_accel.ops import _ref

    g = torch.Generator().manual_seed(0)
    f, z = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    y, w = torch.randint(0, 3, (2, 10, 10), generator=g), torch.randn(3, 4, generator=g)
    meta = lambda t: t.to("meta")  # noqa: E731
    return {
        "grad_dot": lambda: ops.grad_dot(f.flatten(2), meta(z).flatten(2), w, None, backend="torch"),
        "grad_dot twin": lambda: _ref.grad_dot_ref(f.flatten(2), meta(z).flatten(2), w[None], None),
        "classifier_grad": lambda: classifier_grad(meta(f), z, y),
        "dii_scores": lambda: dii_scores(f, z, y, w, meta(torch.zeros(3)), backend="torch"),
        "foreground_paste twin": lambda: _ref.foreground_paste_ref(
            meta(f), f, y[:, :5, :5], torch.tensor([1, 1]), z, z, z, z),
    }


@pytest.mark.parametrize("name", list(_mixed_calls()))
def test_ops_refuse_meta_mixed_with_cpu(name):
    with pytest.raises(ValueError, match="device"):
        _mixed_calls()[name]()


def test_ops_fake_kernels_refuse_mixed_devices():
    from hybrid_accel.ops import extension_available

    if not extension_available():
        pytest.skip("compiled extension not built (HYBRID_ACCEL_SKIP_EXT)")
    f, g, w = torch.randn(2, 4, 5), torch.randn(2, 3, 5, device="meta"), torch.randn(1, 3, 4)
    with pytest.raises(RuntimeError, match="different devices"):
        torch.ops.hybrid_accel.grad_dot(f, g, w, None)


# ------------------------------------------------------------- 6: a truncated image, before training
def test_truncated_image_caught_before_training(tiny_data, tmp_path, capsys, fresh_accelerate_state):
    from hybrid_accel.data import load_manifest

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    img = next(r["image"] for r in load_manifest(data).records if r["split"] == "train")
    _truncate(type(tmp_path)(img), keep=0.9)  # the header stays readable; the pixel data is cut
    argv = FAST + [f"data.root={data}", f"out_dir={tmp_path / 'runs'}", "name=j", "train.steps=2"]
    assert trainer.main(argv) == 2
    err = capsys.readouterr().err
    assert img in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "j").exists()


# ------------------------------------------------------------------------- 5: masks saved as JPEG
def _jpeg_values(mask01):
    """The values a 0/255 mask has after a round trip through JPEG (noise around the edges)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.asarray(mask01) > 0).astype(np.uint8) * 255).save(buf, format="JPEG", quality=75)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def _jpeg_source(root, n=10):
    import numpy as np
    from PIL import Image

    src = _source(root, n)
    for k in range(n):
        m = np.asarray(Image.open(src / "masks" / f"{k}.png"))
        (src / "masks" / f"{k}.png").unlink()
        Image.fromarray(m).save(src / "masks" / f"{k}.jpg", quality=75)  # as many public datasets ship them
    return src


def test_prepare_thresholds_jpeg_masks_and_says_so(tmp_path, capsys):
    import numpy as np

    from hybrid_accel.data import load_manifest, load_meta, read_mask
    from hybrid_accel.data.__main__ import main as data_cli

    src = _jpeg_source(tmp_path / "src")
    raw = np.unique(np.concatenate([_jpeg_values(read_mask(p)).ravel() for p in (src / "masks").iterdir()]))
    assert len(raw) > 10  # the source masks really are noisy
    assert data_cli(["prepare", str(src), "--out", str(tmp_path / "out"), "--strong-count", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "binary up to compression noise" in out and "thresholded at 128" in out
    assert load_meta(tmp_path / "out")["num_classes"] == 2
    for r in load_manifest(tmp_path / "out").records:
        assert set(np.unique(read_mask(r["true_mask"] or r["mask"])).tolist()) <= {0, 1, 255}
    assert data_cli(["prepare", str(src), "--out", str(tmp_path / "t"), "--mask-mapping", "threshold:200",
                     "--strong-count", "2", "--no-progress", "--no-check"]) == 0
    assert "compression noise" not in capsys.readouterr().out
    assert data_cli(["prepare", str(src), "--out", str(tmp_path / "u"), "--mask-mapping", "threshold:x",
                     "--no-progress"]) == 1
    assert "threshold:T needs an integer" in capsys.readouterr().err


def test_prepare_refuses_masks_with_too_many_values(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from hybrid_accel.data.__main__ import main as data_cli

    src = _source(tmp_path / "src")
    grey = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (24, 1))  # 24 grey levels across the mask
    grey[:, :3] = np.arange(100, 124, dtype=np.uint8)[:, None] + 100  # and more, well inside 0..255
    Image.fromarray(grey).save(src / "masks" / "3.png")
    assert data_cli(["prepare", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(src / "masks" / "3.png") in err and "different values" in err and "mask mapping" in err
    assert not (tmp_path / "out").exists()


def test_check_and_train_name_jpeg_noise_masks(tiny_data, tmp_path, capsys, fresh_accelerate_state):
    from PIL import Image

    from hybrid_accel.data import load_manifest, read_mask
    from hybrid_accel.data.__main__ import main as data_cli

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    rec = next(r for r in load_manifest(data).records if r["split"] == "train" and r["kind"] == "strong")
    Image.fromarray(_jpeg_values(read_mask(rec["mask"]) == 1)).save(rec["mask"])  # a 0/255 JPEG mask, unmapped
    assert data_cli(["check", str(data), "--no-progress"]) == 1
    msg = capsys.readouterr().err
    assert rec["mask"] in msg and "threshold:128" in msg and "saved lossy" in msg
    argv = FAST + [f"data.root={data}", f"out_dir={tmp_path / 'runs'}", "name=m", "train.steps=2"]
    assert trainer.main(argv) == 2
    err = capsys.readouterr().err
    assert rec["mask"] in err and "threshold:128" in err and "saved lossy" in err


# ------------------------------------------------------------------ 11: warnings, not silence
def test_training_warns_of_empty_splits_and_unmapped_binary_masks(tmp_path, capsys, fresh_accelerate_state):
    from hybrid_accel.data import load_manifest, make_synthetic_hybrid, read_mask

    data = tmp_path / "data"
    make_synthetic_hybrid(data, "polyp", n_train=12, n_val=0, n_test=0, size=32, strong_count=4, seed=0, workers=1,
                          image_format="png")
    for r in load_manifest(data).records:  # 0/255 masks, never mapped: they would train nothing
        Image.fromarray((read_mask(r["mask"]) * 255).astype(np.uint8)).save(r["mask"])
    argv = FAST + [f"data.root={data}", f"out_dir={tmp_path / 'runs'}", "name=w", "train.steps=1", "method.dii=false",
                   "method.dii_sampling=false"]
    assert trainer.main(argv) == 0
    out = capsys.readouterr().out
    assert "no val images: no best checkpoint is picked and the final test uses the last weights" in out
    assert "no test images: the run ends without a test evaluation" in out
    assert "0/255 binary masks, set mask_mapping 0:0,255:1" in out


# ------------------------------------------------------------------ 12: output that scales
def test_size_listing_is_summarised(tiny_data):
    from hybrid_accel.data import validate_dataset
    from hybrid_accel.data.validate import format_data_summary

    s = validate_dataset(tiny_data, workers=1)
    s["image_sizes"] = {f"{300 + k}x{200 + k % 7}": 1 + (k == 17) * 40 for k in range(300)}  # 300 sizes
    line = next(x for x in format_data_summary(s).splitlines() if x.startswith("image sizes"))
    assert len(line) < 250
    assert line.startswith("image sizes (WxH): 317x203: 41, ")
    assert "and 295 more images in 295 other sizes (300 sizes, width 300..599, height 200..206)" in line


# -------------------------------------------------------------- 10: evaluate's user errors
def test_evaluate_user_errors_are_one_line(run, tiny_data, tmp_path, capsys):
    from hybrid_accel import evaluate

    model = str(ckpt.latest_checkpoint(run))
    cases = [
        (["--model", str(tmp_path / "nope.safetensors"), "--data", str(tiny_data)], "nope.safetensors"),
        (["--model", model, "--data", str(tmp_path / "nodata")], "nodata"),
        (["--model", model, "--data", str(tiny_data), "--split", "bogus"], "bogus"),
    ]
    for argv, names in cases:
        assert evaluate.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and names in err and "Traceback" not in err


def test_evaluate_refuses_a_mask_value_that_is_no_class(run, tiny_data, tmp_path, capsys):
    from hybrid_accel import evaluate
    from hybrid_accel.data import load_manifest, read_mask

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    rec = next(r for r in load_manifest(data).records if r["split"] == "test")
    m = read_mask(rec["mask"]).astype(np.uint8)
    m[0, :4] = 128  # neither polyp (1), background (0) nor the ignore value (255)
    Image.fromarray(m).save(rec["mask"])
    assert evaluate.main(["--model", str(ckpt.latest_checkpoint(run)), "--data", str(data), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "value 128" in err and "mask_mapping" in err and rec["image"] in err and "Traceback" not in err


def test_eval_batch_size_and_an_output_under_a_file(run, tiny_data, tmp_path, capsys):
    from hybrid_accel import evaluate
    from hybrid_accel.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="eval.batch_size=0: must be positive"):
        validate_config(load_config(None, ["eval.batch_size=0"]))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["--model", str(ckpt.latest_checkpoint(run)), "--data", str(tiny_data), "--out", str(blocker / "eval")]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and str(blocker) in err


def test_unloadable_weights_and_an_out_dir_under_a_file(tiny_data, tmp_path, capsys):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not a safetensors file")
    argv = FAST + [f"data.root={tiny_data}", f"out_dir={tmp_path / 'runs'}", "name=w", "train.steps=1",
                   f"model.pretrained={bad}"]
    assert trainer.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.pretrained:") and str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "w").exists()  # nothing written before the weights loaded
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    argv = FAST + [f"data.root={tiny_data}", f"out_dir={blocker / 'runs'}", "name=w", "train.steps=1"]
    assert trainer.main(argv) == 2
    assert f"{blocker} is a file" in capsys.readouterr().err
