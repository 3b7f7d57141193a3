"""The reproduction suite's machinery on a tiny configuration: every method runs, the tables and figures come out."""

import json
import math
from pathlib import Path

import pytest
import yaml

from hybrid_accel import reproduce as rp
from conftest import SCRATCH

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["model.backbone=resnet10t", *SCRATCH, "model.decoder_channels=8", "model.aspp_rates=[1,2,3]", "data.image_size=32",
        "train.batch_size=4", "train.steps=4", "dii.tau=2", "dii.warmup=0", "eval.every=2", "eval.overlays=0",
        "checkpoint.every=0", "data.check=false", "train.cpu=true"]


def _tiny_preset():
    return rp.Preset(name="tiny", description="test", overrides=TINY, seeds=[0],
                     data={"kind": "synthetic", "synthetic_kind": "polyp", "n_train": 12, "n_val": 2, "n_test": 3,
                           "size": 32, "strong_count": 4, "seed": 1})


@pytest.mark.parametrize("method", rp.METHODS, ids=lambda m: m.key)
def test_method_overrides_are_the_method_config(method):
    # a method's switches are read from its config file: on top of the full method's config they give that file
    from hybrid_accel.config import config_to_dict, load_config

    own = load_config(REPO / "configs" / method.config)
    if method.config != rp.REFERENCE:
        assert yaml.safe_load((REPO / "configs" / method.config).read_text())["base"] == rp.REFERENCE
    rebuilt = load_config(REPO / "configs" / rp.REFERENCE, [*method.overrides, f"name={own.name}"])
    assert config_to_dict(rebuilt) == config_to_dict(own)
    assert [o.split("=")[0] for o in method.overrides[:4]] == list(rp.SWITCHES)
    assert (method.dii, method.dcr, method.sampling) == (own.method.dii, own.method.dcr, own.method.dii_sampling)


def test_methods_table_rows():
    flags = {k: (rp.BY_KEY[k].dii, rp.BY_KEY[k].dcr, rp.BY_KEY[k].sampling) for k in rp.ABLATION}
    assert flags["naive-hybrid"] == (False, False, False) and flags["full"] == (True, True, True)
    assert len(set(flags.values())) == len(rp.ABLATION)  # Table 1: each row one combination
    assert rp.BY_KEY["full"].overrides == ("data.train_on=hybrid", "method.dii=true", "method.dcr=true",
                                           "method.dii_sampling=true")
    assert rp.BY_KEY["weakly-supervised"].overrides[-1] == "method.strong_warmup=0"  # no exact mask to warm up on


def test_presets_resolve_to_valid_configs():
    from hybrid_accel.config import load_config, validate_config

    for preset in rp.PRESETS.values():
        for m in rp.METHODS:
            args = rp.trainer_args(preset, m, 0, Path("/nonexistent"), Path("/tmp/x"))
            config = None
            if args[0] == "--config":
                config, args = args[1], args[2:]
            cfg = load_config(config, args)
            validate_config(cfg)
            # runs that share the CPU get their thread count explicitly (not from the load at their start)
            assert cfg.train.cpu_threads == preset.threads


def test_quick_cpu_preset_is_the_cpu_preset_at_half_the_steps():
    cpu, quick = rp.PRESETS["cpu"], rp.PRESETS["cpu-quick"]
    changed = {a: b for a, b in zip(cpu.overrides, quick.overrides) if a != b}
    assert changed == {"train.steps=1000": "train.steps=500", "checkpoint.every=100": "checkpoint.every=0"}
    assert (quick.data, quick.config, quick.jobs, quick.threads) == (cpu.data, cpu.config, cpu.jobs, cpu.threads)
    assert quick.seeds == [0, 1] and cpu.seeds == [0]
    with pytest.raises(ValueError, match="train.stepz"):  # a misspelt key would otherwise change nothing
        rp._replace_overrides(cpu.overrides, "train.stepz=500")


def test_summary_targets():
    # issue 14's targets: full >= naive + 10 and >= few strong + 3; full >= DII+DCR >= DII only; DII+DCR >= DCR
    # only; full within 5 of fully supervised; Spearman >= 0.7; dropped annotations' mean gamma < 0.2
    table = {"full": (80, 82), "naive-hybrid": (68, 70), "few-strong": (76, 78), "fully-supervised": (84, 85),
             "dii-dcr": (79, 80), "dii-only": (75, 77), "dcr-only": (74, 76)}
    recs = []
    for key, dices in table.items():
        for seed, dice in enumerate(dices):
            recs.append({"method": key, "seed": seed, "dice": dice, "assd": 5.0} | (
                {"spearman": 0.75, "spearman_kept": 0.2, "gamma_dropped_mean": 0.1} if key == "full" else {}))
    s = rp.summarize(recs)
    assert s["methods"]["full"]["dice"]["mean"] == 81 and math.isclose(s["methods"]["full"]["dice"]["std"], 2 ** 0.5)
    assert [t["met"] for t in s["targets"]] == [True] * 8
    recs[0]["dice"] = 60  # full method seed 0 drops: mean 71
    met = [t["met"] for t in rp.summarize(recs)["targets"]]
    assert met == [False, False, False, True, True, False, True, True]
    recs[1]["gamma_dropped_mean"] = 0.5  # mean over seeds 0.3
    assert rp.summarize(recs)["targets"][-1]["met"] is False
    text = rp.format_tables(rp.summarize(recs))
    assert "MISSED" in text and "Table 1" in text
    assert rp.summarize([])["targets"][0]["met"] is None  # nothing measured: neither met nor missed


def test_tiny_suite_all_methods_tables_and_figures(tmp_path):
    preset = _tiny_preset()
    out = tmp_path / "suite"
    runs = rp.run_suite(preset, out, inprocess=True, say=lambda m: None)
    assert len(runs) == 8 and all(r["status"] == "done" for r in runs), runs
    res = rp.report(out, preset, "pytest", runs)
    per = res["summary"]["methods"]
    assert set(per) == {m.key for m in rp.METHODS}
    for m in rp.METHODS:
        assert m.label in res["tables"]
        assert ("spearman" in per[m.key]) == m.dii
    assert "Table 4" in res["tables"] and "Table 1" in res["tables"] and "Spearman" in res["tables"]
    for name in ("results.json", "runs.csv", "summary.md", "gamma_hist.png", "curves.png"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "results.json").read_text())  # strict JSON: no NaN
    assert len(doc["runs"]) == 8 and len(doc["summary"]["targets"]) == 8
    assert all(r["val_curve"] for r in doc["runs"])
    # a second call finds every run finished and trains nothing
    again = rp.run_suite(preset, out, inprocess=True, say=lambda m: None)
    assert all(r["status"] == "done (earlier)" for r in again)


def _test_dice(run_dir: Path) -> float:
    return json.loads((run_dir / "test" / "summary.json").read_text())["models"]["net"]["mean_dice"]


def _interrupt_after_first_checkpoint(run_dir: Path) -> None:
    """What a run stopped after its first checkpoint leaves: no test results, nothing saved later."""
    import shutil

    shutil.rmtree(run_dir / "test")
    for name in sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))[1:]:
        shutil.rmtree(run_dir / "checkpoints" / name)


def test_an_interrupted_run_continues_from_its_checkpoint(tmp_path):
    preset = _tiny_preset()
    preset.overrides = [*TINY, "checkpoint.every=2", "checkpoint.keep_last=3"]
    out = tmp_path / "suite"
    run_dir = out / "runs" / "few-strong-s0"
    log = out / "logs" / "few-strong-s0.log"
    said = []
    (first,) = rp.run_suite(preset, out, ["few-strong"], inprocess=True, say=said.append)
    assert first["status"] == "done" and said[-2] == "start few-strong-s0"
    dice = _test_dice(run_dir)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts[0] == "step_00000002", ckpts
    _interrupt_after_first_checkpoint(run_dir)
    said.clear()
    (again,) = rp.run_suite(preset, out, ["few-strong"], inprocess=True, say=said.append)
    assert again["status"] == "done" and said[-2] == "resume few-strong-s0", said
    text = log.read_text()
    assert "resumed from" in text and "at step 2" in text
    assert text.splitlines()[0].endswith(" ".join(rp.trainer_args(preset, rp.BY_KEY["few-strong"], 0, out / "data",
                                                                   out / "runs")))
    assert _test_dice(run_dir) == pytest.approx(dice, abs=1e-6)  # exact resume: the same run, not a new one

    # the same settings spelled otherwise (a value the preset already holds, given again) also continue
    _interrupt_after_first_checkpoint(run_dir)
    said.clear()
    (same,) = rp.run_suite(preset, out, ["few-strong"], inprocess=True, extra=["train.steps=4"], say=said.append)
    assert same["status"] == "done" and said[-2] == "resume few-strong-s0", said
    assert _test_dice(run_dir) == pytest.approx(dice, abs=1e-6)

    # the same folder under other settings is not continued but trained again from scratch
    _interrupt_after_first_checkpoint(run_dir)
    said.clear()
    (other,) = rp.run_suite(preset, out, ["few-strong"], inprocess=True, extra=["train.steps=6"], say=said.append)
    assert other["status"] == "done" and said[-2] == "start few-strong-s0", said
    assert "resumed from" not in log.read_text()
    assert (run_dir / "checkpoints" / "step_00000006").is_dir()


def test_command_line_subprocess_runner(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_suite_cli", REPO / "benchmarks" / "run_suite.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    preset = _tiny_preset()
    rp.PRESETS["tiny-test"] = preset
    try:
        rc = cli.main(["--preset", "tiny-test", "--out", str(tmp_path), "--methods", "few-strong", "--seeds", "3"])
    finally:
        del rp.PRESETS["tiny-test"]
    assert rc == 0
    log = (tmp_path / "logs" / "few-strong-s3.log").read_text()
    assert log.startswith("$ ") and "-m hybrid_accel.train" in log and "log.tracking=none" in log
    assert (tmp_path / "runs" / "few-strong-s3" / "test" / "summary.json").is_file()
    assert "Few strong" in (tmp_path / "summary.md").read_text()


def test_collect_reads_an_undefined_assd_as_nan(tmp_path):
    # a network that predicts no foreground has no surface: summary.json (strict JSON) holds null
    run = tmp_path / "runs" / "naive-hybrid-s0" / "test"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"n_images": 4, "models": {"net": {"mean_dice": 0.0,
                                                                                    "mean_assd": None}}}))
    (rec,) = rp.collect(tmp_path)
    assert rec["dice"] == 0.0 and math.isnan(rec["assd"])
    assert "| Naive hybrid | 0.00 | n/a |" in rp.format_tables(rp.summarize([rec]))
