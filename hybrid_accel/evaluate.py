"""Evaluation: Dice and ASSD of one or more networks and their ensemble, on 1..n processes.

Used by the trainer (:func:`evaluate`) and from the command line::

    python -m hybrid_accel.evaluate --model net1.safetensors --model2 net2.safetensors \\
        --data DATASET_DIR --split test --image-size 352 --out eval/ --overlays 8
    accelerate launch -m hybrid_accel.evaluate ...   # same numbers on several processes

Outputs under ``--out``: ``summary.json`` (per model: per-class and mean Dice/ASSD, counts of
each empty-mask rule), ``per_image.csv`` (one row per image, model and class) and
``overlays/*.png`` (image with truth, then with each model's prediction).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .metrics import CASES, EMPTY_RULES, dice_assd, summarize

__all__ = ["evaluate", "load_models_for_eval", "render_overlay", "to_uint8_image", "paint_labels", "main"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENSEMBLE = "ensemble"
# Class colours for overlays (class 1, 2, ...), cycled when there are more classes.
_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180], [70, 240, 240]],
    dtype=np.float32,
)


# ----------------------------------------------------------------------------------------------
# Models


def load_models_for_eval(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, nn.Module], dict]:
    """Load the network(s) stored at ``path`` for evaluation: ``({name: model}, config)``.

    Handles files written by :func:`hybrid_accel.model.export_model` (one network, named by the
    config's ``name`` entry when present, else ``"net"``), and the trainer's outputs: a run
    directory (its ``export/*.safetensors``, else its newest checkpoint) or a checkpoint folder
    (``checkpoints/step_*`` or ``checkpoints/best``), which return every network of the run
    (``primary`` and ``auxiliary`` with DCR, ``net`` otherwise).
    """
    from .model import load_exported

    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        model, config = load_exported(path, map_location=map_location)
        return {str(config.get("name", "net")): model}, config
    if path.is_dir():
        loaded = _load_trainer_output(path, map_location)
        if loaded is not None:
            return loaded
    raise ValueError(
        f"{path}: cannot load models for evaluation from this path; expected a .safetensors file "
        "written by hybrid_accel.model.export_model, a training run directory or a checkpoint folder"
    )


def _load_trainer_output(path: Path, map_location) -> tuple[dict[str, nn.Module], dict] | None:
    from .checkpoint import is_checkpoint, latest_checkpoint, read_trainer_state
    from .model import build_model, load_exported, load_model_weights

    export = path / "export"
    files = sorted(export.glob("*.safetensors")) if export.is_dir() else []
    if files:
        order = {"primary": 0, "auxiliary": 1}
        models: dict[str, nn.Module] = {}
        config: dict = {}
        for f in sorted(files, key=lambda p: (order.get(p.stem, 2), p.stem)):
            model, cfg = load_exported(f, map_location=map_location)
            models[str(cfg.get("name", f.stem))] = model
            config = config or cfg
        return models, config
    ck = path if is_checkpoint(path) else latest_checkpoint(path)
    if ck is None:
        return None
    state = read_trainer_state(ck)
    models = {}
    for i, name in enumerate(state["net_names"]):
        stem = "model" if i == 0 else f"model_{i}"  # accelerate's save_state names
        weights = next((ck / f"{stem}{ext}" for ext in (".safetensors", ".bin") if (ck / f"{stem}{ext}").is_file()), None)
        if weights is None:
            raise ValueError(f"{ck}: checkpoint lacks the weights of network {name!r} ({stem}.safetensors)")
        model = build_model(**state["model"])
        load_model_weights(model, weights)
        models[name] = model.to(map_location).eval()
    config = {"image_size": state["image_size"], "num_classes": state["num_classes"],
              "class_names": state["class_names"], "step": state["step"], "train_config": state["config"]}
    return models, config


# ----------------------------------------------------------------------------------------------
# Overlays


def to_uint8_image(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised [K, H, W] image tensor back to uint8 RGB [H, W, 3] (one channel repeated, extra ones dropped)."""
    img = image.detach().float().cpu().numpy()
    if img.shape[0] == 1:
        img = np.repeat(img, 3, axis=0)
    img = img[:3] * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return (np.clip(img.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)


def paint_labels(img: np.ndarray, labels: np.ndarray, ignore_index: int | None, alpha: float = 0.45) -> np.ndarray:
    """Colour each foreground class of ``labels`` [H, W] over ``img`` (uint8 [H, W, 3]), with an opaque
    outline; ``ignore_index`` pixels in grey (None: no ignore value). The overlays of evaluate and audit."""
    from scipy import ndimage

    out = img.astype(np.float32)
    for c in np.unique(labels):
        if c == 0:
            continue
        m = labels == c
        if ignore_index is not None and c == ignore_index:
            colour = np.array([128, 128, 128], np.float32)
        else:
            colour = _PALETTE[(int(c) - 1) % len(_PALETTE)]
        out[m] = (1 - alpha) * out[m] + alpha * colour
        out[m & ~ndimage.binary_erosion(m)] = colour
    return out.astype(np.uint8)


def render_overlay(
    image: torch.Tensor,
    truth: np.ndarray,
    preds: Mapping[str, np.ndarray],
    ignore_index: int | None = 255,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
):
    """One PIL image: panels [truth, prediction of each model] drawn over the input image."""
    from PIL import Image, ImageDraw

    base = to_uint8_image(image, mean, std)
    panels = [("truth", paint_labels(base, truth, ignore_index))]
    panels += [(name, paint_labels(base, p, None)) for name, p in preds.items()]
    h, w = base.shape[:2]
    gap = 4
    canvas = Image.new("RGB", (len(panels) * (w + gap) - gap, h + 14), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (name, arr) in enumerate(panels):
        x0 = i * (w + gap)
        canvas.paste(Image.fromarray(arr), (x0, 14))
        draw.text((x0 + 2, 1), name, fill=(0, 0, 0))
    return canvas


def _save_png_atomic(img, path: Path) -> None:
    # Two processes may render the same image (the padded tail of a sharded loader).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".png.tmp")
    os.close(fd)
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------
# Evaluation


def _image_names(dataset: Any, indices: np.ndarray) -> list[str]:
    paths = getattr(dataset, "image_paths", None)
    if paths is None:
        return ["" for _ in indices]
    return [str(paths[int(i)]) for i in indices]


def _json_safe(obj: Any) -> Any:
    """NaN (an undefined mean) becomes null, so that the file is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_outputs(
    out_dir: Path, summary: dict, results: dict[str, dict[str, np.ndarray]], indices: np.ndarray,
    names: list[str], class_names: list[str],
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "summary.json", "w") as f:
        json.dump(_json_safe(summary), f, indent=2, allow_nan=False)
    with open(out_dir / "per_image.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "image", "model", "class", "dice", "assd", "case"])
        for model_name, res in results.items():
            for row, (idx, img_name) in enumerate(zip(indices, names)):
                for j, cname in enumerate(class_names):
                    a = res["assd"][row, j]
                    writer.writerow([
                        int(idx), img_name, model_name, cname, f"{res['dice'][row, j]:.6f}",
                        "" if math.isnan(a) else f"{a:.6f}", CASES[int(res["case"][row, j])],
                    ])


def _foreground_class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """Names of the foreground classes, from the names of all classes (background first) or of
    the foreground classes only; ``class1``, ``class2``... when none are given."""
    k = num_classes - 1
    if class_names is None:
        return [f"class{c}" for c in range(1, num_classes)]
    cls_names = [str(c) for c in class_names]
    cls_names = cls_names[1:] if len(cls_names) == num_classes else cls_names
    if len(cls_names) != k:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    return cls_names


def _overlay_targets(
    out_dir: str | os.PathLike | None, n_overlays: int, n_total: int | None
) -> tuple[set[int], Path | None]:
    """Dataset indices of the ``n_overlays`` images spread evenly over the dataset that get an
    overlay PNG, and the folder for them (created here); none without ``out_dir`` or a dataset size."""
    overlay_ids: set[int] = set()
    overlay_dir = None
    if out_dir is not None and n_overlays > 0 and n_total:
        overlay_ids = set(np.unique(np.linspace(0, n_total - 1, min(n_overlays, n_total)).round().astype(int)).tolist())
        overlay_dir = Path(out_dir) / "overlays"
        overlay_dir.mkdir(parents=True, exist_ok=True)
    return overlay_ids, overlay_dir


@contextlib.contextmanager
def _eval_mode(models: Mapping[str, nn.Module]):
    """Switch ``models`` to eval mode for the block, then give each its own mode back."""
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        yield
    finally:
        for name, m in models.items():
            m.train(modes[name])


def _batch_labels(
    batch: Mapping[str, Any], dataset: Any, num_classes: int, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """The batch's masks [B, H, W] and dataset indices [B] as arrays. A mask value that is neither
    a class nor ``ignore_index`` is a ValueError naming the image."""
    y = batch["mask"].cpu().numpy()
    idx = batch["index"].cpu().numpy().astype(np.int64)
    stray = (y >= num_classes) & (y != ignore_index)
    if stray.any():  # a value such as 128 in a 0/1 mask would silently count as background
        b = int(np.flatnonzero(stray.reshape(len(y), -1).any(1))[0])
        image = _image_names(dataset, idx[b:b + 1])[0] if dataset is not None else str(idx[b])
        raise ValueError(
            f"the mask of {image} holds the value {int(y[b][stray[b]][0])}, which is neither a class "
            f"(0..{num_classes - 1}) nor the ignore value {ignore_index}: map the mask values "
            "(dataset.yaml mask_mapping, e.g. 0:0,255:1) or fix the mask")
    return y, idx


def _predict(models: Mapping[str, nn.Module], x: torch.Tensor, autocast_ctx) -> dict[str, np.ndarray]:
    """Class maps [B, H, W] of each model and, with several models, of the ensemble (the mean of
    their softmax probabilities)."""
    probs = {}
    with autocast_ctx():
        for name, m in models.items():
            probs[name] = m(x).float().softmax(dim=1)
    if len(models) > 1:
        probs[ENSEMBLE] = torch.stack([probs[n] for n in models]).mean(0)
    return {name: p.argmax(dim=1).cpu().numpy() for name, p in probs.items()}


def _score_batch(
    preds: Mapping[str, np.ndarray], y: np.ndarray, idx: np.ndarray, names: Sequence[str], num_classes: int,
    spacing: Sequence[float], ignore_index: int, device: torch.device,
) -> dict[str, Any]:
    """Per-image, per-class Dice, ASSD and empty-mask case of each prediction, as tensors on
    ``device`` for ``gather_for_metrics``: ``{"index": [B], "dice" | "assd" | "case": {name: [B, K]}}``."""
    record: dict[str, Any] = {"index": torch.as_tensor(idx, device=device)}
    for name in names:
        per = [dice_assd(preds[name][b], y[b], num_classes, spacing, ignore_index) for b in range(len(idx))]
        for key in ("dice", "assd", "case"):
            arr = np.stack([r[key] for r in per]).astype(np.float64 if key != "case" else np.int64)
            record.setdefault(key, {})[name] = torch.as_tensor(arr, device=device)
    return record


def _save_overlays(
    images: torch.Tensor, y: np.ndarray, idx: np.ndarray, preds: Mapping[str, np.ndarray], names: Sequence[str],
    overlay_ids: set[int], overlay_dir: Path | None, dataset: Any, ignore_index: int,
    mean: Sequence[float], std: Sequence[float],
) -> None:
    """Write the overlay PNG of each image of the batch whose dataset index is in ``overlay_ids``."""
    for b, i in enumerate(idx):
        if int(i) in overlay_ids:
            img = render_overlay(images[b], y[b], {n: preds[n][b] for n in names}, ignore_index, mean, std)
            stem = Path(_image_names(dataset, np.array([i]))[0]).stem
            _save_png_atomic(img, overlay_dir / (f"{int(i):05d}" + (f"_{stem}" if stem else "") + ".png"))


def _merge_gathered(
    gathered: list[dict], names: Sequence[str]
) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """The gathered records as ``(indices, {name: {"dice" | "assd" | "case": [N, K]}})``, one row
    per distinct image in index order."""
    if not gathered:
        raise ValueError("evaluate: the loader yielded no batch")
    indices = torch.cat([g["index"] for g in gathered]).cpu().numpy()
    # gather_for_metrics drops the padded tail of a prepared loader; the index check below also
    # covers loaders that repeat images in other ways.
    order = np.unique(indices, return_index=True)[1]
    indices = indices[order]
    results = {
        name: {key: torch.cat([g[key][name] for g in gathered]).cpu().numpy()[order] for key in ("dice", "assd", "case")}
        for name in names
    }
    return indices, results


def _make_summary(
    indices: np.ndarray, results: dict[str, dict[str, np.ndarray]], num_classes: int, cls_names: list[str],
    spacing: Sequence[float], seconds: float,
) -> dict:
    """The summary :func:`evaluate` returns and writes to ``summary.json``."""
    return {
        "n_images": int(indices.size),
        "num_classes": int(num_classes),
        "class_names": cls_names,
        "spacing": [float(s) for s in spacing],
        "empty_rules": EMPTY_RULES,
        "seconds": seconds,
        "models": {name: summarize(r["dice"], r["assd"], r["case"], cls_names) for name, r in results.items()},
    }


@torch.no_grad()
def evaluate(
    models: Mapping[str, nn.Module],
    loader: Any,
    accelerator: Any,
    num_classes: int,
    ignore_index: int = 255,
    spacing: Sequence[float] = (1.0, 1.0),
    out_dir: str | os.PathLike | None = None,
    n_overlays: int = 0,
    autocast: bool = True,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict:
    """Evaluate ``models`` (and their ensemble when there are several) on ``loader``.

    The loader yields dicts with ``image`` [B, 3, H, W], ``mask`` [B, H, W] and ``index`` [B]
    (the dataset index, used to drop duplicates and to order the per-image table). It is
    sharded with ``accelerator.prepare`` if it is not already; each process scores its own
    images and the results are gathered (``gather_for_metrics``), so every process returns the
    same summary. The ensemble averages the softmax probabilities of the models.

    Files (main process only, when ``out_dir`` is given): ``summary.json``, ``per_image.csv`` and
    ``n_overlays`` overlay PNGs of images spread evenly over the dataset.

    Returns the summary: ``{"n_images", "num_classes", "class_names", "spacing",
    "empty_rules", "models": {name: metrics.summarize(...)}}``.
    """
    from accelerate.data_loader import DataLoaderStateMixin

    if not models:
        raise ValueError("evaluate: no model given")
    if ENSEMBLE in models:
        raise ValueError(f"evaluate: the name {ENSEMBLE!r} is reserved for the ensemble")
    names = list(models) + ([ENSEMBLE] if len(models) > 1 else [])
    cls_names = _foreground_class_names(class_names, num_classes)
    if not isinstance(loader, DataLoaderStateMixin):
        loader = accelerator.prepare(loader)
    dataset = getattr(loader, "dataset", None)
    n_total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    # overlays undo the normalisation the images were loaded with (HybridDataset.mean/std)
    mean = mean if mean is not None else getattr(dataset, "mean", IMAGENET_MEAN)
    std = std if std is not None else getattr(dataset, "std", IMAGENET_STD)
    overlay_ids, overlay_dir = _overlay_targets(out_dir, n_overlays, n_total)

    autocast_ctx = accelerator.autocast if autocast else contextlib.nullcontext
    device = accelerator.device
    gathered: list[dict] = []
    with _eval_mode(models):
        t0 = time.perf_counter()
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            y, idx = _batch_labels(batch, dataset, num_classes, ignore_index)
            preds = _predict(models, x, autocast_ctx)
            record = _score_batch(preds, y, idx, names, num_classes, spacing, ignore_index, device)
            _save_overlays(batch["image"], y, idx, preds, names, overlay_ids, overlay_dir, dataset,
                           ignore_index, mean, std)
            gathered.append(accelerator.gather_for_metrics(record))

    indices, results = _merge_gathered(gathered, names)
    seconds = round(time.perf_counter() - t0, 3)
    summary = _make_summary(indices, results, num_classes, cls_names, spacing, seconds)
    if n_total is not None and indices.size != n_total:
        accelerator.print(f"evaluate: warning: scored {indices.size} distinct images of {n_total}")
    if out_dir is not None and accelerator.is_main_process:
        _write_outputs(Path(out_dir), summary, results, indices, _image_names(dataset, indices), cls_names)
    accelerator.wait_for_everyone()
    return summary


def format_summary(summary: dict) -> str:
    """A small text table: one row per model, mean and per-class Dice / ASSD."""
    cls = summary["class_names"]
    head = f"{'model':<12}{'mDice':>8}{'mASSD':>9}" + "".join(f"{c[:10] + ' Dice':>16}{'ASSD':>8}" for c in cls)
    lines = [head]
    for name, s in summary["models"].items():
        row = f"{name:<12}{s['mean_dice']:>8.4f}{s['mean_assd']:>9.3f}"
        row += "".join(f"{s['per_class'][c]['dice']:>16.4f}{s['per_class'][c]['assd']:>8.3f}" for c in cls)
        lines.append(row)
    counts = {name: s["counts"] for name, s in summary["models"].items()}
    lines.append(f"images: {summary['n_images']}; empty-mask cases (class-image pairs): {json.dumps(counts)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise argparse.ArgumentTypeError(f"image size {text!r}: expected N or HxW")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hybrid_accel.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported model (.safetensors), a training run folder (both networks) or a trainer checkpoint")
    p.add_argument("--model2", default=None, help="second network (DCR auxiliary); adds an ensemble")
    p.add_argument("--names", nargs="+", default=None, help="names of the networks (default net1, net2)")
    p.add_argument("--data", required=True, help="dataset folder (with its manifest)")
    p.add_argument("--split", default="test", help="split to evaluate")
    p.add_argument("--image-size", type=_parse_size, default=None,
                   help="N or HxW; default: the image_size stored with the model")
    p.add_argument("--batch-size", type=int, default=8, help="images per process and step")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--spacing", type=float, nargs=2, default=(1.0, 1.0), metavar=("ROW", "COL"),
                   help="pixel size for ASSD")
    p.add_argument("--out", default=None, help="output folder for summary.json, per_image.csv, overlays/")
    p.add_argument("--overlays", type=int, default=0, help="number of overlay PNGs to write")
    p.add_argument("--no-autocast", action="store_true", help="run in float32 even under mixed precision")
    return p.parse_args(argv)


def _dataset_class_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "class_names", None)
    if names is None:
        meta = getattr(getattr(dataset, "manifest", None), "meta", None) or {}
        names = meta.get("class_names")
    return list(names) if names else None


def eval_dataset(models: Mapping[str, nn.Module], data: str | os.PathLike, split: str, image_size: Sequence[int]):
    """The ``split`` of the dataset at ``data`` (exact masks), scaled as the networks expect
    (:func:`hybrid_accel.model.input_norm`, stored in their export or checkpoint)."""
    from .data import HybridDataset  # imported here: only the command line needs it
    from .model import input_norm

    norms = {name: input_norm(m) for name, m in models.items()}
    mean, std = next(iter(norms.values()))
    if any(n != (mean, std) for n in norms.values()):
        raise SystemExit(f"the networks expect different input normalisations ({norms}); evaluate them separately")
    return HybridDataset(data, split=split, image_size=tuple(image_size), augment=False, use_true_masks=True,
                         mean=mean, std=std)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except (ValueError, OSError) as e:
        # user errors (a missing or unsafe model file, a missing image or manifest, an unknown split,
        # an output folder under a file): one line that names the thing, exit status 2. DatasetError,
        # WeightsError and CheckpointError are ValueErrors.
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _main(args: argparse.Namespace) -> int:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader


    accelerator = Accelerator()
    models: dict[str, nn.Module] = {}
    config: dict = {}
    for i, path in enumerate([args.model] + ([args.model2] if args.model2 else [])):
        loaded, cfg = load_models_for_eval(path, map_location="cpu")
        config = config or cfg
        if len(loaded) == 1:
            name = args.names[i] if args.names and i < len(args.names) else f"net{i + 1}"
            loaded = {name: next(iter(loaded.values()))}
        for name, m in loaded.items():
            if name in models:
                raise ValueError(f"two networks are named {name!r}; pass distinct --names")
            models[name] = m.to(accelerator.device)
    image_size = args.image_size or config.get("image_size")
    if image_size is None:
        raise ValueError("--image-size is required (the model file does not record one)")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    dataset = eval_dataset(models, args.data, args.split, tuple(image_size))
    for name, m in models.items():
        if m.num_classes != dataset.num_classes:
            raise ValueError(f"network {name!r} predicts {m.num_classes} classes, the dataset has {dataset.num_classes}")
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    summary = evaluate(
        models, loader, accelerator, dataset.num_classes,
        ignore_index=dataset.ignore_index, spacing=tuple(args.spacing), out_dir=args.out,
        n_overlays=args.overlays, autocast=not args.no_autocast,
        class_names=_dataset_class_names(dataset),
    )
    accelerator.print(format_summary(summary))
    if args.out:
        accelerator.print(f"wrote {Path(args.out) / 'summary.json'} and per_image.csv")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
