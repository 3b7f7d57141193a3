"""Train DII + DCR (and every baseline/ablation) under Accelerate.

    accelerate launch -m hybrid_accel.train --config configs/polyp.yaml [key=value ...]
    python -m hybrid_accel.train                      # full method on a small synthetic polyp set
    python -m hybrid_accel.train --config configs/polyp.yaml --resume   # continue the newest run

Config precedence is CLI > YAML > defaults (hybrid_accel/config.py); ``--print-config`` shows the
resolved config and exits. Everything a run writes goes to ``<out_dir>/<name>``: ``config.yaml``,
``checkpoints/``, ``eval/``, ``test/``, ``export/*.safetensors``, ``gamma.csv``, ``gamma_history.npz``
and ``wandb/``.

Per step (DESIGN.md sections 2-3): a batch from the primary sampler (weights 1 / gamma) and one
from the auxiliary sampler (uniform); with DCR each network does one forward over
``cat[x_i, x_j, x_m]``; every ``dii.tau`` steps gamma takes one Adam step from the primary
network's classifier gradients (hybrid_accel.dii). Exit status: 0 done, 2 bad config or data,
3 non-finite loss (the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .config import Config, ConfigError, config_to_dict, load_config, save_config, validate_config
from .data import KIND_STRONG
from .dcr import band_ignored, dcr_forward, dcr_loss, make_mix, single_loss, warmup_loss
from .dii import DIIUpdater, GammaState, append_gamma_history, describe_update, due, gamma_quality, write_gamma_csv
from .sampling import KeyedDataset, StepSampler, derive_seed, hybrid_weights, make_generator, make_step_loader

__all__ = ["main", "train", "Run", "setup_run", "train_loop", "train_step_single", "train_step_dcr", "after_step",
           "finish_run", "TrainingDiverged", "parse_args", "lr_factor"]


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the message names the step."""


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, str | None]:
    p = argparse.ArgumentParser(
        prog="python -m hybrid_accel.train",
        description="Hybrid-supervised segmentation (DII + DCR) under Accelerate.",
        epilog="Overrides: section.key=value, e.g. dii.tau=200 method.dcr=false train.steps=1000",
    )
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults = synthetic demo)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint of this run (or the given checkpoint folder)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    cfg = load_config(args.config, overrides)
    if cfg.name is None:
        cfg.name = Path(args.config).stem if args.config else "synthetic-polyp"
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        raise SystemExit(0)
    return cfg, args.config


# ------------------------------------------------------------------------------------- helpers
def lr_factor(step: int, cfg: Config) -> float:
    """Learning-rate multiplier at (0-based) step: linear warm-up, then poly / cosine / constant."""
    o = cfg.optim
    total = cfg.train.steps
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    t = min(1.0, max(0.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps)))
    if o.schedule == "poly":
        return (1.0 - t) ** o.power
    if o.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def param_groups(nets: Sequence[nn.Module], head_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """Two groups: every network's encoder (``lr_mult`` 1) and the rest, ASPP, decoder and
    classifier (``lr_mult`` = ``optim.head_lr_mult``; the authors' code trains them at 10x)."""
    enc = [p for n in nets for name, p in n.named_parameters() if name.startswith("encoder.")]
    head = [p for n in nets for name, p in n.named_parameters() if not name.startswith("encoder.")]
    return [{"params": enc, "lr_mult": 1.0}, {"params": head, "lr_mult": float(head_lr_mult)}]


def make_optimizer(nets: Sequence[nn.Module], cfg: Config) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or AdamW (``optim.name``) over :func:`param_groups`; the
    learning rate is set per step (times each group's ``lr_mult``)."""
    o = cfg.optim
    groups = param_groups(nets, o.head_lr_mult)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.momentum, 0.999), weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def prepare_data(cfg: Config, accelerator: Any) -> Path:
    """The dataset folder: ``data.root``, or a synthetic set generated once (on the main process)."""
    from .data import make_synthetic_hybrid, synthetic_root

    if cfg.data.root:
        return Path(cfg.data.root).expanduser()
    root = synthetic_root(cfg.data)
    d = cfg.data
    if accelerator.is_local_main_process and not (root / "manifest.csv").is_file():
        _say(accelerator, f"writing a synthetic {d.synthetic_kind} dataset to {root}")
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        make_synthetic_hybrid(tmp, kind=d.synthetic_kind, n_train=d.synthetic_n_train, n_val=d.synthetic_n_val,
                              n_test=d.synthetic_n_test, size=d.synthetic_size, strong_count=d.synthetic_strong,
                              seed=d.synthetic_seed, workers=min(2, os.cpu_count() or 1), faint=d.synthetic_faint)
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, root)  # whole folder at once; a concurrent writer's copy is equivalent
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    return root


def build_datasets(cfg: Config, root: Path) -> dict[str, Any]:
    from .data import HybridDataset
    from .model import default_norm

    d = cfg.data
    kinds = {"hybrid": ("strong", "weak"), "strong": ("strong",), "weak": ("weak",), "full": ("strong", "weak")}[d.train_on]
    # every image that enters a network is scaled as the encoder's pretrained weights expect
    # (build_model records the same default in the model's config, and so in its export)
    mean, std = default_norm(cfg.model.backbone)
    common = dict(image_size=tuple(d.image_size), ignore_index=d.ignore_index, mean=mean, std=std)
    if d.mask_mapping:
        common["mask_mapping"] = d.mask_mapping
    out = {
        # data.weak_boundary_band: items carry the band, applied to the supervised targets only (the DII
        # scores and the DCR paste see whole masks: banded DII scores ranked worse, RESULTS section 5)
        "train": HybridDataset(root, "train", kinds, augment=d.augment, use_true_masks=d.train_on == "full",
                               weak_boundary_band=d.weak_boundary_band, **common),
        # the DII pass: no augmentation, weak images with their own weak masks
        "scan": HybridDataset(root, "train", kinds, augment=False, **common) if cfg.method.dii else None,
        # evaluation against exact masks only
        "val": HybridDataset(root, "val", ("strong",), **common),
        "test": HybridDataset(root, "test", ("strong",), **common),
    }
    return out


def check_against_data(cfg: Config, train_ds: Any) -> None:
    p = []
    n, ns, nw = len(train_ds), len(train_ds.strong_indices), len(train_ds.weak_indices)
    where = f"the train split of {train_ds.root}"
    if n == 0:
        p.append(f"data.train_on={cfg.data.train_on!r}: {where} has no image of that kind")
    if cfg.method.dii and ns == 0:
        p.append(f"method.dii needs strong images for its reference gradient; {where} has none")
    if cfg.method.strong_warmup and ns == 0:
        p.append(f"method.strong_warmup needs strong images; {where} has none")
    if cfg.method.dii and nw == 0:
        p.append(f"method.dii needs weak images to weigh; {where} has none")
    if cfg.data.weak_boundary_band > 0 and nw:
        types = {r.get("weak_type") or "" for r in train_ds.records if r["kind"] == "weak"}
        if "scribble" in types:
            p.append(f"data.weak_boundary_band={cfg.data.weak_boundary_band} ignores the outline of each weak object, "
                     f"which suits region masks (ellipse, box); {where} has scribble weak masks, whose unlabelled "
                     f"pixels are already ignored: set data.weak_boundary_band=0")
    if n and cfg.train.batch_size > n:
        p.append(f"train.batch_size={cfg.train.batch_size} is larger than the training set ({n} images)")
    if p:
        raise ConfigError("invalid configuration for this dataset:\n  - " + "\n  - ".join(p))


def _resolve_run_dir(cfg: Config, accelerator: Any) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from). Decided on the main process, broadcast."""
    from accelerate.utils import broadcast_object_list

    obj: list[Any] = [None, None, None]
    if accelerator.is_main_process:
        out = Path(cfg.out_dir).expanduser()
        pat = re.compile(rf"^{re.escape(cfg.name)}(-\d+)?$")
        siblings = sorted((p for p in out.glob(f"{cfg.name}*") if p.is_dir() and pat.match(p.name)),
                          key=lambda p: (int(p.name.rsplit("-", 1)[1]) if p.name != cfg.name else 1))
        resume = None
        err = None
        if cfg.resume and cfg.resume != "latest":
            resume = Path(cfg.resume).expanduser()
            if not ckpt.is_checkpoint(resume):
                err = f"resume={cfg.resume}: not a checkpoint folder (no {ckpt.TRAINER_STATE})"
            else:
                err = ckpt.check_resume_target(resume)  # names a damaged or unsafe file, offers an older one
            run_dir = resume.parent.parent
        elif cfg.resume == "latest":
            with_ck = [p for p in siblings if ckpt.latest_checkpoint(p) is not None]
            if not with_ck:
                err = f"resume=latest: no checkpoint of a run named {cfg.name!r} under {out}"
                run_dir = out / cfg.name
            else:
                run_dir = with_ck[-1]
                resume, notes = ckpt.resumable_checkpoint(run_dir)  # skips (and names) damaged ones
                for note in notes:
                    _say(accelerator, note)
                if resume is None:
                    err = f"resume=latest: no checkpoint of {run_dir} can be loaded:\n  " + "\n  ".join(notes)
        else:
            run_dir = out / cfg.name
            taken = {p.name for p in siblings if (p / ckpt.CKPT_DIR).exists() or (p / "config.yaml").exists()}
            k = 1
            while run_dir.name in taken:
                k += 1
                run_dir = out / f"{cfg.name}-{k}"
        obj = [str(run_dir), None if resume is None else str(resume), err]
    broadcast_object_list(obj)
    if obj[2]:
        raise ConfigError(obj[2])
    return Path(obj[0]), (Path(obj[1]) if obj[1] else None)


def _setup_wandb(run_dir: Path) -> None:
    """Offline unless the user is logged in (WANDB_API_KEY or a stored key); files under the run."""
    if "WANDB_MODE" not in os.environ:
        logged_in = bool(os.environ.get("WANDB_API_KEY"))
        if not logged_in:
            netrc = Path.home() / ".netrc"
            logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
        if not logged_in:
            os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    os.environ.setdefault("WANDB_SILENT", "true")


class _Meter:
    """Device-side running sums of the loss parts, read (a host sync) only when logged."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.n += 1

    def read(self) -> dict[str, float]:
        out = {k: float(v) / max(1, self.n) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out


# ----------------------------------------------------------------------------------- training
@dataclass
class Run:
    """One training job between two steps: what was built at the start (the accelerator, the data, the
    prepared networks and optimiser, DII's state) and what moves (the step, the best validation score,
    the two training iterators). :func:`train` builds it with :func:`setup_run`, advances it with
    :func:`train_step_single` / :func:`train_step_dcr` and :func:`after_step`, and ends it with
    :func:`finish_run`."""

    cfg: Config
    accelerator: Any
    run_dir: Path
    ds: dict[str, Any]  # train, scan, val, test (hybrid_accel.data.HybridDataset)
    nets: list[nn.Module]  # as prepared by accelerate (DDP-wrapped on several processes)
    optimizer: torch.optim.Optimizer
    eval_loaders: dict[str, Any]
    gamma: GammaState | None = None
    updater: DIIUpdater | None = None
    tracking: bool = False
    start: int = 0
    step: int = 0
    best: float = -math.inf
    best_step: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    it_p: Any = None  # primary training iterator (DII sampling: by gamma)
    it_a: Any = None  # auxiliary training iterator (DCR only; uniform)
    dump: dict[str, Any] = field(default_factory=dict)  # debug.dump: what the distributed tests compare

    def __post_init__(self):
        acc = self.accelerator
        self.train_ds = self.ds["train"]
        self.raw = [acc.unwrap_model(n) for n in self.nets]
        self.names = ["primary", "auxiliary"] if len(self.nets) == 2 else ["net"]
        self.params = [p for n in self.nets for p in n.parameters()]
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        self.num_classes, self.ignore = self.train_ds.num_classes, self.cfg.data.ignore_index
        self.class_names = self.train_ds.manifest.meta.get("class_names")
        self.weak_rank = np.full(len(self.train_ds), -1, dtype=np.int64)
        self.weak_rank[self.train_ds.weak_indices] = np.arange(len(self.train_ds.weak_indices))
        # the samplers' weights during method.strong_warmup: the images with exact masks (every image with
        # data.train_on=full, whose weak images carry their true masks: fully supervised has no warm-up to do)
        exact = np.ones(len(self.train_ds), dtype=bool) if self.train_ds.use_true_masks else (
            self.train_ds.kinds == KIND_STRONG)
        self.strong_only = exact.astype(np.float64)
        self.track_name = self.cfg.eval.model if self.cfg.eval.model != "auto" else (
            "ensemble" if len(self.nets) == 2 else "net")
        self.dump = {"rank": self.rank, "samples": {}, "gamma_checksums": {}}

    # ---- samplers (stateless; see hybrid_accel.sampling)
    def _loader(self, stream: str, step: int, weights: np.ndarray | None):
        cfg = self.cfg
        s = StepSampler(len(self.train_ds), cfg.train.batch_size, cfg.seed, stream, self.rank, weights=weights)
        return iter(make_step_loader(KeyedDataset(self.train_ds), s, step, cfg.train.steps, cfg.train.grad_accum,
                                     cfg.data.num_workers, self.device.type == "cuda"))

    def primary_loader(self, step: int):
        m = self.cfg.method
        if step < m.strong_warmup:
            w = self.strong_only
        elif m.dii_sampling:
            w = hybrid_weights(self.train_ds.kinds, self.weak_rank, self.gamma.gamma, m.sampling_floor)
        else:
            w = None
        return self._loader("primary", step, w)

    def aux_loader(self, step: int):
        return self._loader("auxiliary", step, self.strong_only if step < self.cfg.method.strong_warmup else None)

    def loss_weights(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-sample loss weights of a batch: 1 for strong images, gamma for weak ones (1 without DII)."""
        if self.gamma is None:
            return torch.ones(len(batch["image"])).to(self.device)
        return self.gamma.weights(batch["weak_index"]).to(self.device)

    # ---- state, evaluation
    def trainer_state(self, step: int) -> dict[str, Any]:
        return {"step": step, "best": self.best, "best_step": self.best_step, "history": self.history,
                "gamma": self.gamma.state_dict() if self.gamma is not None else None, "seed": self.cfg.seed,
                "config": config_to_dict(self.cfg),
                # enough to rebuild the networks without the dataset (hybrid_accel.evaluate)
                "model": dict(self.raw[0].config), "net_names": self.names, "num_classes": self.num_classes,
                "image_size": list(self.cfg.data.image_size), "class_names": self.class_names}

    def evaluate(self, split: str, out: Path) -> dict:
        from .evaluate import evaluate

        cfg = self.cfg
        return evaluate(dict(zip(self.names, self.raw)), self.eval_loaders[split], self.accelerator,
                        self.num_classes, ignore_index=self.ignore, spacing=tuple(cfg.eval.spacing), out_dir=out,
                        n_overlays=cfg.eval.overlays, class_names=self.class_names)

    def validate(self) -> None:
        """Evaluate on the val split; on a new best, save the ``best`` checkpoint."""
        cfg, acc, step = self.cfg, self.accelerator, self.step
        summary = self.evaluate("val", self.run_dir / "eval" / ckpt.step_name(step))
        models = summary["models"]
        if self.track_name not in models:
            raise ConfigError(f"eval.model={self.track_name!r}: evaluated models are {', '.join(models)}")
        value = float(models[self.track_name][cfg.eval.metric])
        logs = {f"val/{n}/mean_dice": m["mean_dice"] for n, m in models.items()}
        logs.update({f"val/{n}/mean_assd": m["mean_assd"] for n, m in models.items()})
        acc.log(logs, step=step)
        self.history.append({"step": step, cfg.eval.metric: value})
        improved = value > self.best
        _say(acc, f"step {step}: val {self.track_name} {cfg.eval.metric} {value:.4f}" + (" (best)" if improved else ""))
        if self.tracking and acc.is_main_process and cfg.eval.overlays:
            pngs = sorted((self.run_dir / "eval" / ckpt.step_name(step) / "overlays").glob("*.png"))
            _wandb_log(acc, lambda wandb: {"val/predictions": [wandb.Image(str(p)) for p in pngs]}, step)
        if improved:
            self.best, self.best_step = value, step
            ckpt.save_checkpoint(acc, self.run_dir, "best", self.trainer_state(step) | {"best": value, "best_step": step})


def train(cfg: Config, config_path: str | None = None) -> dict[str, Any]:
    """Run one training job; returns ``{"run_dir", "step", "test", "val_best", "gamma", "stopped"}``."""
    run = setup_run(cfg, config_path)
    try:
        stopped = train_loop(run)
    except TrainingDiverged:
        _finish(run.accelerator, run.tracking)
        raise
    gamma = run.gamma
    result: dict[str, Any] = {"run_dir": str(run.run_dir), "step": run.step,
                              "gamma": None if gamma is None else gamma.gamma.clone(), "test": None,
                              "val_best": run.best if run.best > -math.inf else None, "stopped": stopped}
    if cfg.debug.dump:
        _write_dump(run)
    if stopped:
        _say(run.accelerator, f"stopped after step {run.step} (debug.stop_after)")
        _finish(run.accelerator, run.tracking)
        return result
    result["test"] = finish_run(run)
    return result


def setup_run(cfg: Config, config_path: str | None = None) -> Run:
    """Check the config, start accelerate, resolve the run folder, check and load the data, build and
    prepare the networks, set up DII, resume, start the trackers. Nothing is written to the run folder
    before every check has passed."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    validate_config(cfg)
    if cfg.name is None:
        cfg.name = Path(config_path).stem if config_path else "synthetic-polyp"
    tracking = cfg.log.tracking != "none"
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        cpu=cfg.train.cpu,
        log_with="wandb" if tracking else None,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=True)],
    )
    _set_cpu_threads(cfg, accelerator)
    run_dir, resume_from = _resolve_run_dir(cfg, accelerator)  # verifies the checkpoint; writes nothing
    ds = load_data(cfg, accelerator)
    nets = build_networks(cfg, accelerator, ds["train"].num_classes)
    # only now, with config, checkpoint, data and weights checked: a failed check leaves no run folder behind
    # and a resumed run's config.yaml untouched
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    optimizer = make_optimizer(nets, cfg)
    eval_loaders = {split: DataLoader(ds[split], batch_size=cfg.eval.batch_size, shuffle=False,
                                      num_workers=cfg.data.num_workers)
                    for split in ("val", "test") if len(ds[split])}
    prepared = accelerator.prepare(*nets, optimizer, *eval_loaders.values())
    n = len(nets)
    run = Run(cfg, accelerator, run_dir, ds, list(prepared[:n]), prepared[n],
              dict(zip(eval_loaders, prepared[n + 1:])), tracking=tracking)
    if cfg.method.dii:
        d, train_ds = cfg.dii, ds["train"]
        run.gamma = GammaState(len(train_ds.weak_indices), d.init, d.lr, d.betas, d.eps, d.clip, d.optimizer,
                               d.step_clip)
        run.updater = DIIUpdater(run.gamma, ds["scan"], train_ds.strong_indices, train_ds.weak_indices, d, cfg.seed,
                                 run.ignore, cfg.train.batch_size, cfg.data.num_workers,
                                 cache_bytes=d.scan_cache_mib * 2**20)
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from)
        run.start, run.best, run.best_step = int(state["step"]), float(state["best"]), int(state["best_step"])
        run.history = list(state.get("history", []))
        if run.gamma is not None:
            run.gamma.load_state_dict(state["gamma"])
        _say(accelerator, f"resumed from {resume_from} at step {run.start}")
    if run.start >= cfg.train.steps:
        _say(accelerator, f"nothing to train: step {run.start} >= train.steps={cfg.train.steps}")
    if tracking:
        _setup_wandb(run_dir)
        accelerator.init_trackers(cfg.log.project, config=_flat(config_to_dict(cfg)),
                                  init_kwargs={"wandb": {"name": run_dir.name, "dir": str(run_dir),
                                                         "resume": "allow", "id": _wandb_id(run_dir)}})
    run.step = run.start
    run.it_p = run.primary_loader(run.start)
    run.it_a = run.aux_loader(run.start) if cfg.method.dcr else None
    return run


def load_data(cfg: Config, accelerator: Any) -> dict[str, Any]:
    """The datasets (:func:`build_datasets`) after the dataset check (``data.check``: every file decoded
    once, on the main process) and the checks of the config against the data."""
    from accelerate.utils import broadcast_object_list

    from .data import DatasetError, validate_dataset

    root = prepare_data(cfg, accelerator)
    if cfg.data.check:
        box: list[str | None] = [None]
        if accelerator.is_main_process:
            try:
                summary = validate_dataset(root, mask_mapping=cfg.data.mask_mapping,
                                           require_strong=cfg.data.train_on != "weak", decode_images=True,
                                           workers=4)  # a truncated image fails here, named
                for w in summary["warnings"]:  # e.g. 0/255 masks never mapped: they would train nothing
                    _say(accelerator, f"warning: {w}")
            except DatasetError as e:
                box[0] = str(e)
        broadcast_object_list(box)
        if box[0]:
            raise DatasetError(box[0])
    ds = build_datasets(cfg, root)
    check_against_data(cfg, ds["train"])
    if not len(ds["val"]):
        _say(accelerator, f"warning: {root} has no val images: no best checkpoint is picked and the final test "
                          "uses the last weights")
    if not len(ds["test"]):
        _say(accelerator, f"warning: {root} has no test images: the run ends without a test evaluation")
    return ds


def build_networks(cfg: Config, accelerator: Any, num_classes: int) -> list[nn.Module]:
    """One network, or two with DCR: the same (pretrained) encoder, decoders from different seeds."""
    from .model import build_model

    world, device = accelerator.num_processes, accelerator.device
    sync_bn = cfg.model.sync_bn if cfg.model.sync_bn is not None else (world > 1 and device.type != "cpu")
    nets = []
    for k in range(2 if cfg.method.dcr else 1):
        torch.manual_seed(derive_seed(cfg.seed, "init", k))
        net = build_model(cfg.model.backbone, num_classes, cfg.model.output_stride, tuple(cfg.model.aspp_rates),
                          cfg.model.decoder_channels, pretrained=cfg.model.pretrained,
                          channels_last=cfg.model.channels_last, compile=cfg.model.compile,
                          fast_depthwise=cfg.model.fast_depthwise)
        if sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        nets.append(net)
    return nets


def train_loop(run: Run) -> bool:
    """Steps from ``run.step`` to ``train.steps``; True when ``debug.stop_after`` ended the loop early."""
    from tqdm.auto import tqdm

    cfg, acc = run.cfg, run.accelerator
    B, accum, steps = cfg.train.batch_size, cfg.train.grad_accum, cfg.train.steps
    n_nets = len(run.nets)
    # image passes through a network per optimiser step, for the throughput log
    passes_dcr = (3 * B if cfg.method.dcr else B) * n_nets * accum
    passes_warm = (B if cfg.method.dcr_supervision == "split" or not cfg.method.dcr else 2 * B) * n_nets * accum
    passes, meter, t_log = 0, _Meter(), time.perf_counter()
    bar = tqdm(total=steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (acc.is_main_process and cfg.log.progress))
    try:
        while run.step < steps:
            step = run.step
            _set_train(run.nets, cfg.model.freeze_bn)  # evaluation and the DII pass switch to eval mode
            # dropout and anything else on torch's global RNG: a function of (seed, rank, step)
            torch.manual_seed(derive_seed(cfg.seed, "step", run.rank, step))
            lr = cfg.optim.lr * lr_factor(step, cfg)
            for gr in run.optimizer.param_groups:
                gr["lr"] = lr * gr["lr_mult"]
            for micro in range(accum):
                bp = next(run.it_p)
                if cfg.debug.dump and step < 4:
                    run.dump["samples"].setdefault(str(step), []).extend(bp["index"].tolist())
                with acc.accumulate(*run.nets):
                    if cfg.method.dcr:
                        loss, parts = train_step_dcr(run, bp, next(run.it_a), micro)
                    else:
                        loss, parts = train_step_single(run, bp)
                    optimizer_step(run, loss, micro)
                meter.add(parts)
            passes += passes_warm if step < cfg.method.strong_warmup else passes_dcr
            run.step += 1
            bar.update(1)
            if run.step % cfg.log.every == 0 or run.step == steps:
                vals = meter.read()
                dt = time.perf_counter() - t_log
                t_log, ips, passes = time.perf_counter(), passes * run.world / max(dt, 1e-9), 0
                vals.update({"lr": lr, "throughput/image_passes_per_s": ips})
                acc.log(vals, step=run.step)
                bar.set_postfix(loss=f"{vals.get('loss/total', float('nan')):.4f}", ips=f"{ips:.0f}")
            after_step(run)
            if cfg.debug.stop_after == run.step:
                return True
        return False
    finally:
        bar.close()


def train_step_single(run: Run, bp: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One network on the primary batch: (weighted) cross-entropy; returns (loss, logged parts)."""
    x = bp["image"].to(run.device, non_blocking=True)
    y = band_ignored(bp["mask"].to(run.device, non_blocking=True), bp.get("band"), run.ignore)
    return single_loss(run.nets[0](x), y, run.loss_weights(bp), run.ignore)


def train_step_dcr(run: Run, bp: dict[str, Any], ba: dict[str, Any], micro: int) -> tuple[torch.Tensor, dict]:
    """Two networks on the primary batch ``bp`` (x_i) and the auxiliary batch ``ba`` (x_j): during
    ``method.strong_warmup`` supervised only; then the DCR loss on ``cat[x_i, x_j, x_m]`` with lambda
    ramped over ``method.lambda_warmup`` steps. Returns (loss, logged parts)."""
    cfg, m, step, dev = run.cfg, run.cfg.method, run.step, run.device
    x_i, y_i = bp["image"].to(dev, non_blocking=True), bp["mask"].to(dev, non_blocking=True)
    x_j, y_j = ba["image"].to(dev, non_blocking=True), ba["mask"].to(dev, non_blocking=True)
    w_i, w_j = run.loss_weights(bp), run.loss_weights(ba)
    if step < m.strong_warmup:
        return warmup_loss(run.nets[0], run.nets[1], x_i, x_j, band_ignored(y_i, bp.get("band"), run.ignore),
                           band_ignored(y_j, ba.get("band"), run.ignore), w_i, w_j, m.dcr_supervision, run.ignore)
    mix = make_mix(x_i, x_j, y_i, run.num_classes, m.paste, run.ignore,  # pastes the whole weak object
                   make_generator(cfg.seed, "paste", run.rank, step, micro))
    out1, out2 = dcr_forward(run.nets[0], run.nets[1], x_i, x_j, mix)
    ramp = m.lambda_warmup
    lam = m.dcr_weight * (min(1.0, (step - m.strong_warmup) / ramp) if ramp else 1.0)
    bands = {}
    if "band" in bp:  # data.weak_boundary_band: ignored, or taught by the other network (method.band_fill)
        bands = {"band_i": bp["band"].to(dev, non_blocking=True), "band_j": ba["band"].to(dev, non_blocking=True),
                 "band_fill": m.band_fill}
    return dcr_loss(out1, out2, y_i, y_j, w_i, w_j, mix, x_i, x_j, lam, m.paste, m.pseudo_loss, run.ignore,
                    m.dcr_supervision, **bands)


def optimizer_step(run: Run, loss: torch.Tensor, micro: int) -> None:
    """Backward and (on the last micro-batch) the optimiser step; a non-finite loss stops the run before
    the optimiser writes NaNs into the weights (a host sync per micro-step, cheap next to the step)."""
    cfg, acc, step = run.cfg, run.accelerator, run.step
    if step + 1 == cfg.debug.nan_at_step:
        loss = loss * float("nan")
    bad = (~torch.isfinite(loss.detach())).float()
    if run.world > 1:
        bad = acc.reduce(bad, reduction="sum")
    if bad.item() > 0:
        raise TrainingDiverged(
            f"non-finite loss at step {step + 1} (micro-batch {micro}); stopping. The last good "
            f"checkpoint is {ckpt.latest_checkpoint(run.run_dir) or 'none (no checkpoint was written yet)'}"
        )
    acc.backward(loss)
    if acc.sync_gradients and cfg.optim.grad_clip:
        acc.clip_grad_norm_(run.params, cfg.optim.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def after_step(run: Run) -> None:
    """What follows an optimiser step: a gamma update when due, the end of the strong warm-up,
    validation, a checkpoint."""
    cfg, step, warmup = run.cfg, run.step, run.cfg.method.strong_warmup
    # with strong_warmup, weak images enter with a first gamma update behind them
    if run.updater is not None and (due(step, cfg.dii.tau, max(cfg.dii.warmup, warmup)) or (warmup and step == warmup)):
        gamma_update(run)
        if cfg.method.dii_sampling:
            run.it_p = run.primary_loader(step)  # the primary sampler sees the new gamma from this step on
    if warmup and step == warmup:  # the end of the warm-up: weak images come in
        if not (run.updater is not None and cfg.method.dii_sampling):
            run.it_p = run.primary_loader(step)
        run.it_a = run.aux_loader(step) if cfg.method.dcr else None
        _say(run.accelerator, f"step {step}: end of the strong warm-up, weak images and the DCR term come in")
    if "val" in run.eval_loaders and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
        run.validate()
    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
        ckpt.save_checkpoint(run.accelerator, run.run_dir, ckpt.step_name(step), run.trainer_state(step),
                             cfg.checkpoint.keep_last)


def gamma_lr_scale(cfg: Config, step: int, updates_done: int) -> float:
    """The factor on gamma's learning rate for the update at ``step``, after ``updates_done`` updates.

    ``constant``: 1. ``poly``: the network's schedule factor (the authors' code). ``inv_sqrt`` (not in
    the paper): 1 / sqrt(k) at the k-th update, a Robbins-Monro step. Early updates, which separate the
    dropped annotations from the kept ones best, move gamma most; later ones, whose scores for the kept
    masks hover about 0, cannot random-walk a good mask into gamma 0 (benchmarks/RESULTS.md, section 5)."""
    if cfg.dii.lr_schedule == "poly":
        return lr_factor(step, cfg)
    if cfg.dii.lr_schedule == "inv_sqrt":
        return 1.0 / math.sqrt(updates_done + 1)
    return 1.0


def gamma_update(run: Run) -> None:
    """One DII update of gamma from the primary network (``dii.networks=both``: from both), then its log
    line, metrics and history."""
    cfg, acc, step, gamma = run.cfg, run.accelerator, run.step, run.gamma
    gamma_lr = gamma_lr_scale(cfg, step, gamma.updates)
    nets = run.raw[:2] if cfg.dii.networks == "both" else run.raw[:1]
    stats = run.updater.update(nets, acc, step, acc.autocast, gamma_lr)
    if cfg.debug.check_gamma and run.world > 1:
        cs = torch.tensor([gamma.checksum()], dtype=torch.float64, device=run.device)
        allcs = acc.gather(cs).cpu()
        if not torch.all(allcs == allcs[0]):
            raise RuntimeError(f"gamma differs across processes after step {step}: {allcs.tolist()}")
    run.dump["gamma_checksums"][str(step)] = gamma.checksum()
    stats.update(gamma_quality(gamma, run.train_ds.quality[run.train_ds.weak_indices]))
    acc.log(stats, step=step)
    if run.tracking and acc.is_main_process:
        _wandb_log(acc, lambda wandb: {"dii/gamma": wandb.Histogram(gamma.gamma.numpy())}, step)
    _say(acc, describe_update(step, stats))
    if acc.is_main_process:
        append_gamma_history(run.run_dir / "gamma_history.npz", step, gamma.gamma, run.updater.last_scores)


def finish_run(run: Run) -> dict | None:
    """The last validation and checkpoint, the test (on the best validation weights with
    ``eval.test_on=best``), the export of every network and gamma.csv; returns the test summary."""
    from .evaluate import format_summary
    from .model import export_model

    cfg, acc, step = run.cfg, run.accelerator, run.step
    if "val" in run.eval_loaders and run.start < cfg.train.steps:
        run.validate()
    if run.start < cfg.train.steps or ckpt.latest_checkpoint(run.run_dir) is None:
        ckpt.save_checkpoint(acc, run.run_dir, ckpt.step_name(step), run.trainer_state(step), cfg.checkpoint.keep_last)
    best_dir = run.run_dir / ckpt.CKPT_DIR / "best"
    test_from = "last"
    if cfg.eval.test_on == "best" and (best_dir / ckpt.TRAINER_STATE).is_file() and run.best_step != step:
        acc.load_state(str(best_dir))
        test_from = f"best (step {run.best_step})"
    summary = None
    if "test" in run.eval_loaders:
        summary = run.evaluate("test", run.run_dir / "test")
        _say(acc, f"test ({test_from} weights, {summary['n_images']} images):\n{format_summary(summary)}")
        m = summary["models"][run.track_name]
        acc.log({"test/mean_dice": m["mean_dice"], "test/mean_assd": m["mean_assd"]}, step=step)
        _say(acc, f"test {run.track_name}: Dice {m['mean_dice']:.4f}  ASSD {m['mean_assd']:.3f}")
    if acc.is_main_process:
        for name, net in zip(run.names, run.raw):
            export_model(net, run.run_dir / "export" / f"{name}.safetensors",
                         {"name": name, "image_size": list(cfg.data.image_size), "num_classes": run.num_classes,
                          "class_names": run.class_names, "ignore_index": run.ignore, "weights": test_from,
                          "train_config": config_to_dict(cfg)})
        if run.gamma is not None:
            write_gamma_csv(run.run_dir / "gamma.csv", run.gamma, run.train_ds)
        _say(acc, f"exported {', '.join(run.names)} to {run.run_dir / 'export'}")
    _finish(acc, run.tracking)
    return summary


def _write_dump(run: Run) -> None:
    """``debug.dump``: the first steps' samples, gamma's checksums, gamma and a weight checksum per rank."""
    (run.run_dir / "debug").mkdir(parents=True, exist_ok=True)
    run.dump["gamma"] = None if run.gamma is None else run.gamma.gamma.tolist()
    run.dump["weights_checksum"] = float(sum(p.detach().double().sum() for p in run.params))
    with open(run.run_dir / "debug" / f"rank{run.rank}.json", "w") as f:
        json.dump(run.dump, f)


def _wandb_log(accelerator: Any, make: Any, step: int) -> None:
    """Log ``make(wandb)`` to the wandb tracker: images and histograms are niceties, never a reason to stop."""
    try:
        import wandb

        accelerator.get_tracker("wandb").log(make(wandb), step=step)
    except Exception:
        pass


def cpu_thread_count(requested: int, processes: int, load: float, cores: int) -> int:
    """torch CPU threads per process: ``requested`` when set, else the physical cores shared among the
    processes, or 1 when the CPU is already busy (``load``, other processes' busy cores from
    :func:`busy_cores`, above half the cores).

    OpenMP threads that share cores with other busy processes wait on each other: on a loaded
    2-core machine two threads per process ran 20x slower than one (benchmarks/RESULTS.md, section 2.2).
    ``accelerate launch`` exports OMP_NUM_THREADS=1 when it is not set, which on an idle CPU leaves
    all but one core unused, hence the count is set here rather than inherited."""
    if requested:
        return requested
    if load > 0.5 * cores:
        return 1
    return max(1, cores // max(1, processes))


def _physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        n = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):  # a container or taskset may allow fewer
        n = min(n, len(os.sched_getaffinity(0)))
    return max(1, n)


def busy_cores(window: float = 0.5) -> float:
    """CPUs kept busy by other processes right now: the machine's non-idle time over ``window``
    seconds (``/proc/stat``) less this process's own, in cores.

    Not the load average: that decays over minutes, so a run started just after another one ended
    read the finished run's load as "busy" and trained on one thread, twice as slow. Falls back to the
    1-minute load average where ``/proc/stat`` is missing (macOS, Windows)."""
    def snap() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [float(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return sum(v), v[3] + v[4]  # total, idle + iowait (jiffies)

    a, own0, t0 = snap(), time.process_time(), time.perf_counter()
    if a is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(window)
    b, own1, t1 = snap(), time.process_time(), time.perf_counter()
    if b is None or b[0] <= a[0]:
        return 0.0
    busy = (1.0 - (b[1] - a[1]) / (b[0] - a[0])) * (os.cpu_count() or 1)
    return max(0.0, busy - (own1 - own0) / max(t1 - t0, 1e-6))


def _set_cpu_threads(cfg: Config, accelerator: Any) -> None:
    """Set torch's CPU threads (``train.cpu_threads``; 0 = :func:`cpu_thread_count`'s choice)."""
    if accelerator.device.type != "cpu" and not cfg.train.cpu_threads:
        return
    cores = _physical_cores()
    load = 0.0 if cfg.train.cpu_threads else busy_cores()
    n = cpu_thread_count(cfg.train.cpu_threads, accelerator.num_processes, load, cores)
    torch.set_num_threads(n)
    if n == 1 and not cfg.train.cpu_threads and cores > 1:
        _say(accelerator, f"CPU busy ({load:.1f} of {cores} cores in use by other processes, "
                          f"{accelerator.num_processes} process(es) here): "
                          "using 1 torch thread per process (set train.cpu_threads to choose)")


def _set_train(nets: Sequence[nn.Module], freeze_bn: bool) -> None:
    for net in nets:
        net.train()
        if freeze_bn:
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def _say(accelerator: Any, *msg: Any) -> None:
    """``accelerator.print`` (main process only), flushed: logs arrive in order under pipes and launchers."""
    accelerator.print(*msg, flush=True)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if not isinstance(v, list) else str(v)
    return out


def _wandb_id(run_dir: Path) -> str:
    # stable per run directory, so a resumed run appends to the same wandb run
    return f"{run_dir.name[:40]}-{derive_seed(str(run_dir.resolve())) % 16**8:08x}"


def _finish(accelerator: Any, tracking: bool) -> None:
    accelerator.wait_for_everyone()
    if tracking:
        accelerator.end_training()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg, path = parse_args(argv)
        train(cfg, path)
    except (ConfigError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        from .data import DatasetError
        from .model import WeightsError

        if isinstance(e, DatasetError):
            print(f"error: dataset problem:\n{e}", file=sys.stderr)
            return 2
        if isinstance(e, WeightsError):  # a model.pretrained file that does not fit or cannot be read
            print(f"error: model.pretrained: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
