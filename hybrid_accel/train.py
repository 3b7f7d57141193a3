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
import csv
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .config import Config, ConfigError, config_to_dict, load_config, save_config, validate_config
from .data import KIND_STRONG
from .data.synthetic import FAINT
from .dcr import dcr_forward, dcr_loss, make_mix, single_loss, warmup_loss
from .dii import DIIUpdater, GammaState, due
from .sampling import KeyedDataset, StepSampler, derive_seed, hybrid_weights, make_generator, make_step_loader

__all__ = ["main", "train", "TrainingDiverged", "parse_args", "lr_factor"]


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


def _synthetic_root(cfg: Config) -> Path:
    d = cfg.data
    key = (d.synthetic_kind, d.synthetic_n_train, d.synthetic_n_val, d.synthetic_n_test, d.synthetic_size,
           d.synthetic_strong, d.synthetic_seed, 1)
    if d.synthetic_kind == "polyp" and d.synthetic_faint != FAINT:  # folders made before the option keep their name
        key += (d.synthetic_faint,)
    if d.synthetic_dir:
        return Path(d.synthetic_dir).expanduser()
    base = Path(os.environ.get("HYBRID_ACCEL_CACHE", Path.home() / ".cache" / "hybrid_accel"))
    return base / f"synth-{d.synthetic_kind}-{derive_seed(*key) % 16**10:010x}"


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
    from .data import make_synthetic_hybrid

    if cfg.data.root:
        return Path(cfg.data.root).expanduser()
    root = _synthetic_root(cfg)
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
        "train": HybridDataset(root, "train", kinds, augment=d.augment, use_true_masks=d.train_on == "full", **common),
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
def train(cfg: Config, config_path: str | None = None) -> dict[str, Any]:
    """Run one training job; returns ``{"run_dir", "step", "test", "val_best", "gamma"}``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .data import DatasetError, validate_dataset
    from .evaluate import evaluate, format_summary
    from .model import build_model, export_model

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
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    _set_cpu_threads(cfg, accelerator)
    run_dir, resume_from = _resolve_run_dir(cfg, accelerator)  # verifies the checkpoint; writes nothing

    # ---- data
    root = prepare_data(cfg, accelerator)
    if cfg.data.check:
        problem = None
        if accelerator.is_main_process:
            try:
                summary = validate_dataset(root, mask_mapping=cfg.data.mask_mapping,
                                           require_strong=cfg.data.train_on != "weak", decode_images=True,
                                           workers=4)  # a truncated image fails here, named
                for w in summary["warnings"]:  # e.g. 0/255 masks never mapped: they would train nothing
                    _say(accelerator, f"warning: {w}")
            except DatasetError as e:
                problem = str(e)
        from accelerate.utils import broadcast_object_list

        box = [problem]
        broadcast_object_list(box)
        if box[0]:
            raise DatasetError(box[0])
    ds = build_datasets(cfg, root)
    train_ds = ds["train"]
    check_against_data(cfg, train_ds)
    if not len(ds["val"]):
        _say(accelerator, f"warning: {root} has no val images: no best checkpoint is picked and the final test "
                          "uses the last weights")
    if not len(ds["test"]):
        _say(accelerator, f"warning: {root} has no test images: the run ends without a test evaluation")
    num_classes, ignore = train_ds.num_classes, cfg.data.ignore_index
    class_names = train_ds.manifest.meta.get("class_names")
    weak_rank = np.full(len(train_ds), -1, dtype=np.int64)
    weak_rank[train_ds.weak_indices] = np.arange(len(train_ds.weak_indices))

    # ---- networks, optimiser: one prepare
    n_nets = 2 if cfg.method.dcr else 1
    sync_bn = cfg.model.sync_bn if cfg.model.sync_bn is not None else (world > 1 and device.type != "cpu")
    nets = []
    for k in range(n_nets):
        torch.manual_seed(derive_seed(cfg.seed, "init", k))  # different decoders, same pretrained backbone
        net = build_model(cfg.model.backbone, num_classes, cfg.model.output_stride, tuple(cfg.model.aspp_rates),
                          cfg.model.decoder_channels, pretrained=cfg.model.pretrained,
                          channels_last=cfg.model.channels_last, compile=cfg.model.compile)
        if sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        nets.append(net)
    params = [p for n in nets for p in n.parameters()]
    # only now, with config, checkpoint, data and weights checked: a failed check leaves no run folder behind
    # and a resumed run's config.yaml untouched
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    optimizer = make_optimizer(nets, cfg)
    eval_loaders = {}
    for split in ("val", "test"):
        if len(ds[split]):
            eval_loaders[split] = DataLoader(ds[split], batch_size=cfg.eval.batch_size, shuffle=False,
                                             num_workers=cfg.data.num_workers)
    prepared = accelerator.prepare(*nets, optimizer, *eval_loaders.values())
    nets = list(prepared[:n_nets])
    optimizer = prepared[n_nets]
    eval_loaders = dict(zip(eval_loaders, prepared[n_nets + 1:]))
    raw = [accelerator.unwrap_model(n) for n in nets]
    names = ["primary", "auxiliary"] if n_nets == 2 else ["net"]

    # ---- DII
    gamma = None
    updater = None
    if cfg.method.dii:
        d = cfg.dii
        gamma = GammaState(len(train_ds.weak_indices), d.init, d.lr, d.betas, d.eps, d.clip)
        updater = DIIUpdater(gamma, ds["scan"], train_ds.strong_indices, train_ds.weak_indices, d, cfg.seed,
                             ignore, cfg.train.batch_size, cfg.data.num_workers)

    # ---- resume
    start, best, best_step, history = 0, -math.inf, -1, []
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from)
        start, best, best_step = int(state["step"]), float(state["best"]), int(state["best_step"])
        history = list(state.get("history", []))
        if gamma is not None:
            gamma.load_state_dict(state["gamma"])
        _say(accelerator, f"resumed from {resume_from} at step {start}")
    if start >= cfg.train.steps:
        _say(accelerator, f"nothing to train: step {start} >= train.steps={cfg.train.steps}")

    # ---- trackers
    if tracking:
        _setup_wandb(run_dir)
        accelerator.init_trackers(cfg.log.project, config=_flat(config_to_dict(cfg)),
                                  init_kwargs={"wandb": {"name": run_dir.name, "dir": str(run_dir),
                                                         "resume": "allow", "id": _wandb_id(run_dir)}})

    # ---- samplers (stateless; see hybrid_accel.sampling)
    B, accum, steps = cfg.train.batch_size, cfg.train.grad_accum, cfg.train.steps
    keyed = KeyedDataset(train_ds)

    warmup = cfg.method.strong_warmup
    strong_only = (train_ds.kinds == KIND_STRONG).astype(np.float64)  # the samplers' weights during strong_warmup

    def primary_loader(step: int):
        if step < warmup:
            w = strong_only
        else:
            w = hybrid_weights(train_ds.kinds, weak_rank, gamma.gamma) if cfg.method.dii_sampling else None
        s = StepSampler(len(train_ds), B, cfg.seed, "primary", rank, weights=w)
        return iter(make_step_loader(keyed, s, step, steps, accum, cfg.data.num_workers, device.type == "cuda"))

    def aux_loader(step: int):
        s = StepSampler(len(train_ds), B, cfg.seed, "auxiliary", rank, weights=strong_only if step < warmup else None)
        return iter(make_step_loader(keyed, s, step, steps, accum, cfg.data.num_workers, device.type == "cuda"))

    it_p = primary_loader(start)
    it_a = aux_loader(start) if cfg.method.dcr else None
    dump: dict[str, Any] = {"rank": rank, "samples": {}, "gamma_checksums": {}}

    def trainer_state(step: int) -> dict[str, Any]:
        return {"step": step, "best": best, "best_step": best_step, "history": history,
                "gamma": gamma.state_dict() if gamma is not None else None, "seed": cfg.seed,
                "config": config_to_dict(cfg),
                # enough to rebuild the networks without the dataset (hybrid_accel.evaluate)
                "model": dict(raw[0].config), "net_names": names, "num_classes": num_classes,
                "image_size": list(cfg.data.image_size), "class_names": class_names}

    def run_eval(split: str, step: int, out: Path) -> dict:
        models = dict(zip(names, raw))
        return evaluate(models, eval_loaders[split], accelerator, num_classes, ignore_index=ignore,
                        spacing=tuple(cfg.eval.spacing), out_dir=out, n_overlays=cfg.eval.overlays,
                        class_names=class_names)

    track_name = cfg.eval.model if cfg.eval.model != "auto" else ("ensemble" if n_nets == 2 else "net")
    # image passes through a network per optimiser step, for the throughput log
    passes_dcr = (3 * B if cfg.method.dcr else B) * n_nets * accum
    passes_warm = (B if cfg.method.dcr_supervision == "split" or not cfg.method.dcr else 2 * B) * n_nets * accum
    passes = 0
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not (accelerator.is_main_process and cfg.log.progress))
    meter = _Meter()
    t_log = time.perf_counter()
    step = start
    stopped = False
    try:
        while step < steps:
            _set_train(nets, cfg.model.freeze_bn)  # evaluation and the DII pass switch to eval mode
            # dropout and anything else on torch's global RNG: a function of (seed, rank, step)
            torch.manual_seed(derive_seed(cfg.seed, "step", rank, step))
            lr = cfg.optim.lr * lr_factor(step, cfg)
            for gr in optimizer.param_groups:
                gr["lr"] = lr * gr["lr_mult"]
            warming = step < warmup
            for micro in range(accum):
                bp = next(it_p)
                if cfg.debug.dump and step < 4:
                    dump["samples"].setdefault(str(step), []).extend(bp["index"].tolist())
                with accelerator.accumulate(*nets):
                    x_i = bp["image"].to(device, non_blocking=True)
                    y_i = bp["mask"].to(device, non_blocking=True)
                    w_i = (gamma.weights(bp["weak_index"]) if gamma is not None else torch.ones(len(x_i))).to(device)
                    if cfg.method.dcr:
                        ba = next(it_a)
                        x_j = ba["image"].to(device, non_blocking=True)
                        y_j = ba["mask"].to(device, non_blocking=True)
                        w_j = (gamma.weights(ba["weak_index"]) if gamma is not None else torch.ones(len(x_j))).to(device)
                        if warming:
                            loss, parts = warmup_loss(nets[0], nets[1], x_i, x_j, y_i, y_j, w_i, w_j,
                                                      cfg.method.dcr_supervision, ignore)
                        else:
                            mix = make_mix(x_i, x_j, y_i, num_classes, cfg.method.paste, ignore,
                                           make_generator(cfg.seed, "paste", rank, step, micro))
                            out1, out2 = dcr_forward(nets[0], nets[1], x_i, x_j, mix)
                            ramp = cfg.method.lambda_warmup
                            lam = cfg.method.dcr_weight * (min(1.0, (step - warmup) / ramp) if ramp else 1.0)
                            loss, parts = dcr_loss(out1, out2, y_i, y_j, w_i, w_j, mix, x_i, x_j, lam,
                                                   cfg.method.paste, cfg.method.pseudo_loss, ignore,
                                                   cfg.method.dcr_supervision)
                    else:
                        loss, parts = single_loss(nets[0](x_i), y_i, w_i, ignore)
                    if step + 1 == cfg.debug.nan_at_step:
                        loss = loss * float("nan")
                    # a host sync per micro-step: cheap next to a forward/backward, and it stops a
                    # diverged run before the optimiser writes NaNs into the weights
                    bad = (~torch.isfinite(loss.detach())).float()
                    if world > 1:
                        bad = accelerator.reduce(bad, reduction="sum")
                    if bad.item() > 0:
                        raise TrainingDiverged(
                            f"non-finite loss at step {step + 1} (micro-batch {micro}); stopping. The last good "
                            f"checkpoint is {ckpt.latest_checkpoint(run_dir) or 'none (no checkpoint was written yet)'}"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.optim.grad_clip:
                        accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                meter.add(parts)
            passes += passes_warm if warming else passes_dcr
            step += 1
            bar.update(1)

            if step % cfg.log.every == 0 or step == steps:
                vals = meter.read()
                dt = time.perf_counter() - t_log
                ips = passes * world / max(dt, 1e-9)
                t_log, passes = time.perf_counter(), 0
                vals.update({"lr": lr, "throughput/image_passes_per_s": ips})
                accelerator.log(vals, step=step)
                bar.set_postfix(loss=f"{vals.get('loss/total', float('nan')):.4f}", ips=f"{ips:.0f}")

            # with strong_warmup, weak images enter with a first gamma update behind them
            if updater is not None and (due(step, cfg.dii.tau, max(cfg.dii.warmup, warmup)) or (warmup and step == warmup)):
                gamma_lr = lr_factor(step, cfg) if cfg.dii.lr_schedule == "poly" else 1.0
                stats = updater.update(raw[0], accelerator, step, accelerator.autocast, gamma_lr)
                if cfg.debug.check_gamma and world > 1:
                    cs = torch.tensor([gamma.checksum()], dtype=torch.float64, device=device)
                    allcs = accelerator.gather(cs).cpu()
                    if not torch.all(allcs == allcs[0]):
                        raise RuntimeError(f"gamma differs across processes after step {step}: {allcs.tolist()}")
                dump["gamma_checksums"][str(step)] = gamma.checksum()
                stats.update(_gamma_quality(gamma, train_ds))
                _log_gamma(accelerator, gamma, stats, step, tracking)
                if accelerator.is_main_process:
                    _append_gamma_history(run_dir / "gamma_history.npz", step, gamma.gamma)
                if cfg.method.dii_sampling:
                    it_p = primary_loader(step)  # the primary sampler sees the new gamma from this step on
            if warmup and step == warmup:  # the end of the warm-up: weak images come in
                if not (updater is not None and cfg.method.dii_sampling):
                    it_p = primary_loader(step)
                it_a = aux_loader(step) if cfg.method.dcr else None
                _say(accelerator, f"step {step}: end of the strong warm-up, weak images and the DCR term come in")

            if "val" in eval_loaders and cfg.eval.every and step % cfg.eval.every == 0 and step < steps:
                best, best_step = _validate(run_eval, accelerator, run_dir, step, track_name, cfg, best, best_step,
                                            history, trainer_state, tracking)

            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < steps:
                ckpt.save_checkpoint(accelerator, run_dir, ckpt.step_name(step), trainer_state(step),
                                     cfg.checkpoint.keep_last)

            if cfg.debug.stop_after == step:
                stopped = True
                break
        bar.close()
    except TrainingDiverged:
        bar.close()
        _finish(accelerator, tracking)
        raise

    result: dict[str, Any] = {"run_dir": str(run_dir), "step": step, "gamma": None if gamma is None else gamma.gamma.clone(),
                              "test": None, "val_best": best if best > -math.inf else None, "stopped": stopped}
    if cfg.debug.dump:
        (run_dir / "debug").mkdir(parents=True, exist_ok=True)
        dump["gamma"] = None if gamma is None else gamma.gamma.tolist()
        dump["weights_checksum"] = float(sum(p.detach().double().sum() for p in params))
        with open(run_dir / "debug" / f"rank{rank}.json", "w") as f:
            json.dump(dump, f)
    if stopped:
        _say(accelerator, f"stopped after step {step} (debug.stop_after)")
        _finish(accelerator, tracking)
        return result

    # ---- final stage: last validation, checkpoint, test, export
    if "val" in eval_loaders and start < steps:
        best, best_step = _validate(run_eval, accelerator, run_dir, step, track_name, cfg, best, best_step,
                                    history, trainer_state, tracking)
    if start < steps or ckpt.latest_checkpoint(run_dir) is None:
        ckpt.save_checkpoint(accelerator, run_dir, ckpt.step_name(step), trainer_state(step), cfg.checkpoint.keep_last)
    best_dir = run_dir / ckpt.CKPT_DIR / "best"
    test_from = "last"
    if cfg.eval.test_on == "best" and (best_dir / ckpt.TRAINER_STATE).is_file() and best_step != step:
        accelerator.load_state(str(best_dir))
        test_from = f"best (step {best_step})"
    if "test" in eval_loaders:
        summary = run_eval("test", step, run_dir / "test")
        result["test"] = summary
        _say(accelerator, f"test ({test_from} weights, {summary['n_images']} images):\n{format_summary(summary)}")
        m = summary["models"][track_name]
        accelerator.log({"test/mean_dice": m["mean_dice"], "test/mean_assd": m["mean_assd"]}, step=step)
        _say(accelerator, f"test {track_name}: Dice {m['mean_dice']:.4f}  ASSD {m['mean_assd']:.3f}")
    if accelerator.is_main_process:
        size = list(cfg.data.image_size)
        for name, net in zip(names, raw):
            export_model(net, run_dir / "export" / f"{name}.safetensors",
                         {"name": name, "image_size": size, "num_classes": num_classes, "class_names": class_names,
                          "ignore_index": ignore, "weights": test_from, "train_config": config_to_dict(cfg)})
        if gamma is not None:
            _write_gamma_csv(run_dir / "gamma.csv", gamma, train_ds)
        _say(accelerator, f"exported {', '.join(names)} to {run_dir / 'export'}")
    _finish(accelerator, tracking)
    return result


def cpu_thread_count(requested: int, processes: int, load: float, cores: int) -> int:
    """torch CPU threads per process: ``requested`` when set, else the physical cores shared among the
    processes, or 1 when the CPU is already busy (load above half the cores).

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


def _set_cpu_threads(cfg: Config, accelerator: Any) -> None:
    """Set torch's CPU threads (``train.cpu_threads``; 0 = :func:`cpu_thread_count`'s choice)."""
    if accelerator.device.type != "cpu" and not cfg.train.cpu_threads:
        return
    cores = _physical_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    n = cpu_thread_count(cfg.train.cpu_threads, accelerator.num_processes, load, cores)
    torch.set_num_threads(n)
    if n == 1 and not cfg.train.cpu_threads and cores > 1:
        _say(accelerator, f"CPU busy (load {load:.1f} on {cores} cores, {accelerator.num_processes} process(es)): "
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


def _gamma_quality(gamma: GammaState, train_ds: Any) -> dict[str, float]:
    q = np.asarray(train_ds.quality)[train_ds.weak_indices]
    ok = np.isfinite(q)
    if ok.sum() < 3:
        return {}
    from scipy.stats import spearmanr

    g = gamma.gamma.numpy()[ok]
    if np.ptp(g) == 0 or np.ptp(q[ok]) == 0:
        return {}
    return {"dii/spearman_quality": float(spearmanr(g, q[ok]).statistic)}


def _log_gamma(accelerator: Any, gamma: GammaState, stats: dict, step: int, tracking: bool) -> None:
    accelerator.log(stats, step=step)
    if tracking and accelerator.is_main_process:
        try:
            import wandb

            accelerator.get_tracker("wandb").log({"dii/gamma": wandb.Histogram(gamma.gamma.numpy())}, step=step)
        except Exception:  # the histogram is a nicety; never stop training for it
            pass
    rho = stats.get("dii/spearman_quality")
    _say(accelerator, 
        f"step {step}: gamma update, mean {stats['dii/gamma_mean']:.3f} std {stats['dii/gamma_std']:.3f}, "
        f"{100 * stats['dii/score_pos_frac']:.0f}% positive scores, "
        f"strong-set foreground excess {stats['dii/strong_fg_excess']:+.3f}"
        + (f", Spearman(gamma, true IoU) {rho:.3f}" if rho is not None else "")
        + f" ({stats['dii/seconds_strong'] + stats['dii/seconds_scan']:.1f} s)"
    )


def _validate(run_eval, accelerator, run_dir, step, track_name, cfg, best, best_step, history, trainer_state, tracking):
    summary = run_eval("val", step, run_dir / "eval" / ckpt.step_name(step))
    models = summary["models"]
    if track_name not in models:
        raise ConfigError(f"eval.model={track_name!r}: evaluated models are {', '.join(models)}")
    value = float(models[track_name][cfg.eval.metric])
    logs = {f"val/{n}/mean_dice": m["mean_dice"] for n, m in models.items()}
    logs.update({f"val/{n}/mean_assd": m["mean_assd"] for n, m in models.items()})
    accelerator.log(logs, step=step)
    history.append({"step": step, cfg.eval.metric: value})
    improved = value > best
    _say(accelerator, f"step {step}: val {track_name} {cfg.eval.metric} {value:.4f}" + (" (best)" if improved else ""))
    if tracking and accelerator.is_main_process and cfg.eval.overlays:
        try:
            import wandb

            pngs = sorted((run_dir / "eval" / ckpt.step_name(step) / "overlays").glob("*.png"))
            accelerator.get_tracker("wandb").log({"val/predictions": [wandb.Image(str(p)) for p in pngs]}, step=step)
        except Exception:
            pass
    if improved:
        best, best_step = value, step
        ckpt.save_checkpoint(accelerator, run_dir, "best", trainer_state(step) | {"best": best, "best_step": step})
    return best, best_step


def _write_gamma_csv(path: Path, gamma: GammaState, train_ds: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["weak_index", "dataset_index", "image", "gamma", "true_quality"])
        for k, i in enumerate(train_ds.weak_indices):
            w.writerow([k, int(i), train_ds.image_paths[int(i)], f"{float(gamma.gamma[k]):.6f}",
                        f"{float(train_ds.quality[int(i)]):.6f}"])
    os.replace(tmp, path)


def _append_gamma_history(path: Path, step: int, gamma: torch.Tensor) -> None:
    """Add the snapshot after the DII update at ``step`` to ``<run>/gamma_history.npz``.

    Arrays ``step`` [U] and ``gamma`` [U, n_weak] (weak rank order, as gamma.csv). Rows at or after
    ``step`` are dropped first: a resumed run redoes them. Rewritten whole (atomically) at each
    update; at the paper's scale (11k weak images, ~50 updates) that is a few MB every tau steps.
    """
    steps, rows = np.zeros(0, dtype=np.int64), np.zeros((0, len(gamma)), dtype=np.float32)
    if path.is_file():
        with np.load(path) as f:
            keep = f["step"] < step
            steps, rows = f["step"][keep], f["gamma"][keep]
    steps = np.append(steps, np.int64(step))
    rows = np.concatenate([rows, gamma.detach().cpu().numpy().astype(np.float32)[None]])
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, step=steps, gamma=rows)
    os.replace(tmp, path)


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
