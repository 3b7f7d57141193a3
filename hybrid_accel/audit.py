"""Annotation audit: which weak annotations did DII trust least, and which most?

    python -m hybrid_accel.audit runs/polyp                      # writes runs/polyp/audit/
    python -m hybrid_accel.audit runs/polyp --out audit-polyp --top 24 --no-predict

DII learns one weight gamma per weak image; a low gamma means the image's own gradient pointed
away from the strong set's, which is what a wrong annotation does (a missed polyp, a badly
placed ellipse). Ranking the weak images by gamma gives a list of the annotations most worth
re-checking. From a finished training run (``gamma.csv``; else its newest checkpoint) this writes:

- ``audit.csv``: one row per weak image, lowest gamma first: rank, weak index, dataset index,
  image and weak-mask paths, gamma, gamma after every DII update (``step:gamma`` pairs, from
  ``gamma_history.npz``), the weak mask's true IoU/Dice when the manifest knows them (simulated
  weak labels), and the IoU between the model's prediction and the weak mask (low: the network
  disagrees with the annotation);
- ``index.html``: the lowest- and highest-weighted images, each as image | weak mask | prediction
  (| exact mask when known), with gamma's trajectory; ``lowest.png`` / ``highest.png`` as grids;
- ``gamma_hist.png``: the histogram of gamma (dropped vs kept foregrounds when known) and, when
  the true quality is known, gamma against the true IoU (with Spearman's rank correlation).
"""

from __future__ import annotations

import argparse
import csv
import html
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ._plot import pyplot, save

__all__ = ["load_run", "predict_weak", "write_audit", "main"]


def _read_gamma(run_dir: Path) -> tuple[np.ndarray, int | None]:
    """Final gamma per weak rank: ``gamma.csv``, else the newest checkpoint's; (gamma, step or None)."""
    path = run_dir / "gamma.csv"
    if path.is_file():
        from .dii import read_gamma_csv

        return read_gamma_csv(path)[0], None
    from .checkpoint import latest_checkpoint, read_trainer_state

    ck = latest_checkpoint(run_dir)
    if ck is not None:
        state = read_trainer_state(ck)
        if state.get("gamma") is not None:
            return state["gamma"]["gamma"].double().numpy(), int(state["step"])
    raise FileNotFoundError(f"{run_dir}: no gamma.csv and no checkpoint with gamma: was this a run with DII "
                            "(method.dii=true)?")


def _run_norm(run_dir: Path, cfg: Any) -> tuple[list[float], list[float]]:
    """The input normalisation of the run's networks: from an export, else the backbone's default."""
    from .model import default_norm, read_exported_config

    exports = sorted((run_dir / "export").glob("*.safetensors"))
    if exports:
        model_cfg = read_exported_config(exports[0])["model"]
        if "mean" in model_cfg and "std" in model_cfg:
            return list(model_cfg["mean"]), list(model_cfg["std"])
    return default_norm(cfg.model.backbone)


def load_run(run_dir: str | os.PathLike, data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """What the audit needs from a run: its config, gamma, gamma history and the weak images."""
    import yaml

    from .config import config_from_dict
    from .data import HybridDataset, synthetic_root

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a training run (no config.yaml)")
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    root = Path(data_root) if data_root else (Path(cfg.data.root).expanduser() if cfg.data.root else None)
    if root is None:
        root = synthetic_root(cfg.data)
    if not (root / "manifest.csv").is_file() and not root.is_file():
        raise FileNotFoundError(f"{root}: the run's dataset is not there; pass --data")
    d = cfg.data
    mean, std = _run_norm(run_dir, cfg)
    common = dict(image_size=tuple(d.image_size), ignore_index=d.ignore_index, augment=False, mean=mean, std=std)
    if d.mask_mapping:
        common["mask_mapping"] = d.mask_mapping
    ds = HybridDataset(root, "train", ("strong", "weak"), **common)
    gamma, step = _read_gamma(run_dir)
    if len(gamma) != ds.n_weak:
        raise ValueError(f"{run_dir}: {len(gamma)} gammas but {root} has {ds.n_weak} weak train images")
    hist_steps, hist = np.zeros(0, dtype=np.int64), np.zeros((0, len(gamma)), dtype=np.float32)
    if (run_dir / "gamma_history.npz").is_file():
        with np.load(run_dir / "gamma_history.npz") as f:
            hist_steps, hist = f["step"], f["gamma"]
    has_true = any(r["kind"] == "weak" and r.get("true_mask") for r in ds.records)
    truth_ds = HybridDataset(root, "train", ("strong", "weak"), use_true_masks=True, **common) if has_true else None
    q_dice = np.array([r.get("quality_dice", math.nan) if r["kind"] == "weak" else math.nan for r in ds.records],
                      dtype=np.float64)
    return {"run_dir": run_dir, "cfg": cfg, "root": root, "dataset": ds, "truth": truth_ds, "gamma": gamma,
            "step": step, "history_steps": hist_steps, "history": hist,
            "quality_iou": ds.quality[ds.weak_indices], "quality_dice": q_dice[ds.weak_indices]}


@torch.no_grad()
def predict_weak(run: dict, device: str = "cpu", batch_size: int = 32) -> np.ndarray:
    """The primary network's argmax prediction [n_weak, H, W] for every weak image (eval mode)."""
    from .evaluate import load_models_for_eval

    models, _ = load_models_for_eval(run["run_dir"], map_location=device)
    model = models.get("primary") or models.get("net") or next(iter(models.values()))
    model.eval()
    ds = run["dataset"]
    out = []
    idx = ds.weak_indices
    for s in range(0, len(idx), batch_size):
        x = torch.stack([ds[int(i)]["image"] for i in idx[s:s + batch_size]]).to(device)
        out.append(model(x).argmax(1).to(torch.uint8).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + tuple(run["cfg"].data.image_size), dtype=np.uint8)


def _iou_fg(a: np.ndarray, b: np.ndarray, ignore: int) -> float:
    """IoU of the foreground (any class > 0) of a and b over pixels b does not ignore; 1 when both empty."""
    valid = b != ignore
    fa, fb = (a > 0) & valid, (b > 0) & valid
    union = (fa | fb).sum()
    return float((fa & fb).sum() / union) if union else 1.0


def _panel_row(run: dict, k: int, pred: np.ndarray | None, label: str):
    """One PIL image: the input, the weak mask, the prediction and the exact mask (when known)."""
    from PIL import Image, ImageDraw

    from .evaluate import paint_labels, to_uint8_image

    ds, ignore = run["dataset"], run["cfg"].data.ignore_index
    i = int(ds.weak_indices[k])
    item = ds[i]
    base = to_uint8_image(item["image"], ds.mean, ds.std)
    panels = [("image", base), ("weak mask", paint_labels(base, item["mask"].numpy(), ignore))]
    if pred is not None:
        panels.append(("prediction", paint_labels(base, pred, None)))
    if run["truth"] is not None:
        panels.append(("exact mask", paint_labels(base, run["truth"][i]["mask"].numpy(), ignore)))
    h, w = base.shape[:2]
    scale = max(1, 96 // max(h, w))  # small images are enlarged so the page is readable
    gap, top = 4, 26
    canvas = Image.new("RGB", (len(panels) * (w * scale + gap) - gap, h * scale + top), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), label, fill=(0, 0, 0))
    for j, (name, arr) in enumerate(panels):
        x0 = j * (w * scale + gap)
        canvas.paste(Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST), (x0, top))
        draw.text((x0 + 2, 13), name, fill=(80, 80, 80))
    return canvas


def _grid(images: Sequence[Any], path: Path, cols: int = 2) -> None:
    from PIL import Image

    if not images:
        return
    w, h = max(im.width for im in images), max(im.height for im in images)
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * (w + 8), rows * (h + 8)), (255, 255, 255))
    for n, im in enumerate(images):
        canvas.paste(im, ((n % cols) * (w + 8), (n // cols) * (h + 8)))
    canvas.save(path)


def _plot(run: dict, path: Path) -> float:
    """gamma histogram (+ gamma vs true IoU when known); returns Spearman (nan when unknown)."""
    from .metrics import spearman

    g, q = run["gamma"], run["quality_iou"]
    known = np.isfinite(q).any()
    rho = spearman(g, q) if known else math.nan
    plt = pyplot("gamma_hist.png")  # optional (the dev extra): the page then goes without the figure
    if plt is None:
        return rho

    fig, axes = plt.subplots(1, 2 if known else 1, figsize=(9 if known else 4.5, 3.2), dpi=110, squeeze=False)
    ax = axes[0][0]
    bins = np.linspace(min(0.0, g.min()), max(1.0, g.max()), 21)
    if known:
        ax.hist([g[q == 0], g[~(q == 0)]], bins=bins, stacked=True, label=["foreground dropped", "other"])
        ax.legend(fontsize=8)
    else:
        ax.hist(g, bins=bins)
    ax.set_xlabel("gamma")
    ax.set_ylabel("weak images")
    ax.set_title(f"{run['run_dir'].name}: {len(g)} weak images", fontsize=9)
    if known:
        ax = axes[0][1]
        ax.scatter(q, g, s=6, alpha=0.5)
        ax.set_xlabel("true IoU of the weak mask")
        ax.set_ylabel("gamma")
        ax.set_title(f"Spearman {rho:.3f}", fontsize=9)
    save(fig, path)
    return rho


def write_audit(run: dict, out: str | os.PathLike, top: int = 16, preds: np.ndarray | None = None) -> dict:
    """Write audit.csv, index.html, lowest.png, highest.png and gamma_hist.png to ``out``."""
    out = Path(out)
    (out / "instances").mkdir(parents=True, exist_ok=True)
    ds, g = run["dataset"], run["gamma"]
    ignore = run["cfg"].data.ignore_index
    n = len(g)
    agree = np.full(n, math.nan)
    if preds is not None:
        agree = np.array([_iou_fg(preds[k], ds[int(ds.weak_indices[k])]["mask"].numpy(), ignore) for k in range(n)])
    # lowest gamma first; among equal gammas, the images the network disagrees with most
    order = np.lexsort((np.nan_to_num(agree, nan=1.0), g))
    hs, hist = run["history_steps"], run["history"]
    rows = []
    with open(out / "audit.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "weak_index", "dataset_index", "image", "weak_mask", "gamma", "gamma_history",
                    "true_iou", "true_dice", "pred_weak_iou"])
        for rank, k in enumerate(order):
            i = int(ds.weak_indices[k])
            traj = " ".join(f"{int(s)}:{hist[u, k]:.4f}" for u, s in enumerate(hs))
            row = [rank, int(k), i, ds.image_paths[i], ds.mask_path(i), f"{g[k]:.6f}", traj,
                   _fmt(run["quality_iou"][k]), _fmt(run["quality_dice"][k]), _fmt(agree[k])]
            w.writerow(row)
            rows.append(row)
    rho = _plot(run, out / "gamma_hist.png")
    top = min(top, n)
    sections = []
    for title, ks, png in (("Lowest gamma (most worth re-checking)", order[:top], "lowest.png"),
                           ("Highest gamma (most trusted)", order[::-1][:top], "highest.png")):
        cards, images = [], []
        for k in ks:
            k = int(k)
            label = f"weak #{k}  gamma {g[k]:.3f}" + (f"  true IoU {run['quality_iou'][k]:.2f}"
                                                      if np.isfinite(run["quality_iou"][k]) else "")
            im = _panel_row(run, k, None if preds is None else preds[k], label)
            im.save(out / "instances" / f"weak_{k:06d}.png")
            images.append(im)
            traj = ", ".join(f"{hist[u, k]:.2f}" for u in range(len(hs))) or "n/a"
            src = html.escape(ds.image_paths[int(ds.weak_indices[k])])
            cards.append(f'<div class="card"><img src="instances/weak_{k:06d}.png"><br>'
                         f"<code>{src}</code><br>gamma history: {html.escape(traj)}</div>")
        _grid(images, out / png)
        sections.append(f"<h2>{html.escape(title)}</h2>\n" + "\n".join(cards))
    head = (f"<p>Run <code>{html.escape(str(run['run_dir']))}</code>, dataset <code>{html.escape(str(run['root']))}"
            f"</code>: {n} weak images; gamma mean {g.mean():.3f}, {100 * (g < 0.1).mean():.0f}% below 0.1, "
            f"{100 * (g > 0.9).mean():.0f}% above 0.9"
            + (f"; Spearman(gamma, true IoU) {rho:.3f}" if np.isfinite(rho) else "")
            + (f"; gamma from the checkpoint at step {run['step']}" if run["step"] is not None else "")
            + ". Full list, lowest gamma first: <a href=\"audit.csv\">audit.csv</a>.</p>")
    page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>DII annotation audit</title><style>"
            "body{font-family:sans-serif;margin:1em} .card{display:inline-block;margin:6px;font-size:12px;"
            "vertical-align:top;max-width:520px;word-break:break-all}</style></head><body>"
            "<h1>DII annotation audit</h1>" + head + '<img src="gamma_hist.png"><br>' + "\n".join(sections)
            + "</body></html>\n")
    (out / "index.html").write_text(page)
    return {"out": out, "n_weak": n, "spearman": rho, "order": order, "rows": rows}


def _fmt(v: float) -> str:
    return "" if not np.isfinite(v) else f"{v:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybrid_accel.audit",
                                description="Rank a run's weak annotations by their learned DII weight gamma.")
    p.add_argument("run_dir", help="a training run folder (with config.yaml and gamma.csv or a checkpoint)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/audit)")
    p.add_argument("--top", type=int, default=16, help="images shown in each of the lowest/highest lists")
    p.add_argument("--data", default=None, help="dataset folder, if it moved since training")
    p.add_argument("--no-predict", action="store_true", help="skip the network's predictions (no model needed)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    try:
        run = load_run(a.run_dir, a.data)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    preds = None if a.no_predict else predict_weak(run, a.device)
    res = write_audit(run, a.out or Path(a.run_dir) / "audit", a.top, preds)
    rho = res["spearman"]
    print(f"{res['n_weak']} weak images ranked by gamma" + (f"; Spearman(gamma, true IoU) {rho:.3f}"
                                                             if np.isfinite(rho) else ""))
    print("lowest gamma: " + ", ".join(f"{r[3]} ({float(r[5]):.3f})" for r in res["rows"][:5]))
    print(f"written: {res['out'] / 'audit.csv'}, {res['out'] / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
