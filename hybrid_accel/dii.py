"""Dynamic Instance Indicators (DESIGN.md section 2, the paper's Algorithm 1).

One weight ``gamma[k]`` in [clip] per weak image (strong images weigh 1). Every ``tau`` network steps:

1. ``g_S``: the gradient of the mean cross-entropy over strong images with respect to the primary
   network's 1x1 classifier, from forward passes in eval mode under ``no_grad``
   (:func:`classifier_grad`). Each process sums its shard of a global list of strong
   images and the sums are all-reduced, so the mean is the same whatever the number of processes.
2. The weak scan: for every weak image k (or a random subset), ``s_k = <g_k, g_S>`` with ``g_k`` the
   gradient of image k's own loss (un-mixed, un-augmented, with its weak mask) from the same kind of
   forward pass (:func:`dii_scores`, on the fused ``hybrid_accel.ops.grad_dot`` op: no per-sample
   gradient is ever materialised). The scan is sharded across processes; the scores are gathered so
   every process holds all of them.
3. The hypergradient ``dL_S/dgamma_k ~= -s_k`` (identity Hessian) drives one Adam step, then gamma is
   clipped. Every process does the same arithmetic on the same gathered numbers, so gamma is
   identical everywhere (``debug.check_gamma`` verifies it with a collective).

Adam is written out here (it is five lines) instead of ``torch.optim.Adam`` so that a subset scan
updates only the scanned entries, each with its own step count (lazy Adam): a torch optimiser
would also move unscanned gammas along their old momentum. With ``dii.scan=all`` every entry
has the same step count and the update is exactly ``torch.optim.Adam`` (tested).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from . import ops
from .losses import per_instance_ce
from .sampling import make_generator

__all__ = ["GammaState", "reference_grad", "calibrate_logits", "centred_reference", "weak_scores", "DIIUpdater", "due",
           "ce_grad_logits", "classifier_grad", "dii_scores", "gamma_quality", "describe_update", "write_gamma_csv",
           "read_gamma_csv", "append_gamma_history", "foreground_area", "ScanCache"]


# ------------------------------------------------------------------ per-instance classifier gradients
def _check_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    # a meta tensor among CPU ones would otherwise yield values computed from uninitialised memory
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; move them to one device")


def ce_grad_logits(logits_low: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """delta_k = d l_k / d z_k for every instance, at the classifier's resolution, in float32.

    ``l_k`` is instance k's pixel-wise cross-entropy (mean over its valid pixels) of the logits
    upsampled bilinearly (align_corners=False) to the labels' size. Instances are independent, so one
    backward pass of ``sum_k l_k`` yields every instance's own gradient. Call it under ``no_grad`` (not
    ``inference_mode``); it enables autograd locally on a detached copy. float64 logits give a
    float64 gradient (the accumulation dtype of ``ops.grad_dot``).
    """
    if logits_low.dim() != 4:
        raise ValueError(f"ce_grad_logits: `logits_low` must be [B, C, h, w], got {tuple(logits_low.shape)}")
    if labels.dim() != 3 or labels.shape[0] != logits_low.shape[0]:
        raise ValueError(
            f"ce_grad_logits: `labels` must be [B={logits_low.shape[0]}, H, W], got {tuple(labels.shape)}"
        )
    _check_device("ce_grad_logits", "logits_low", logits_low, labels=labels)
    acc = torch.float64 if logits_low.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        z = logits_low.detach().to(acc).requires_grad_(True)
        up = F.interpolate(z, size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
        loss = per_instance_ce(up, labels.long(), ignore_index).sum()
        (delta,) = torch.autograd.grad(loss, z)
    return delta


def classifier_grad(
    feats: torch.Tensor,
    logits_low: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``mean_k(w_k l_k)`` with respect to the 1x1 classifier's weight [C, F] and bias [C].

    ``feats`` [B, F, h, w] are the classifier's inputs and ``logits_low`` [B, C, h, w] its outputs from
    the same forward pass. Used for the strong-set reference gradient g_S of DII.
    """
    _check_device("classifier_grad", "logits_low", logits_low, feats=feats, labels=labels, weights=weights)
    delta = ce_grad_logits(logits_low, labels, ignore_index)
    B = delta.shape[0]
    if weights is not None:
        delta = delta * weights.to(delta).view(B, 1, 1, 1)
    d = delta.flatten(2)
    h = feats.detach().to(d.dtype).flatten(2)
    gW = torch.einsum("bcp,bfp->cf", d, h) / B
    gb = d.sum(dim=(0, 2)) / B
    return gW, gb


def dii_scores(
    feats: torch.Tensor,
    logits_low: torch.Tensor,
    labels: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = 255,
    backend: str | None = None,
    chunk_size: int | None = 16,
    normalize: str = "none",
) -> torch.Tensor:
    """Per-instance scores ``s_k = <grad_theta' l_k, g_ref>`` for the final 1x1 classifier.

    ``feats`` [B, F, h, w] and ``logits_low`` [B, C, h, w] come from one forward pass; ``labels``
    [B, H, W] are at image resolution (ignore value allowed). The DII hypergradient is ``-s_k``.
    Instances are processed ``chunk_size`` at a time (None: all at once), which bounds the memory of
    the full-resolution cross-entropy gradient without changing any result. ``backend`` is that of
    the fused ``ops.grad_dot``. Returns [B] (or [B, R] for a stacked [R, C, F] reference), float32.

    ``normalize="area"`` (``dii.normalize``, not in the paper) divides each s_k by image k's foreground
    area (:func:`foreground_area`): the score per unit of foreground, so that a missed small polyp
    counts as much as a missed large one (the paper's score scales with the polyp's area).
    """
    if normalize not in ("none", "area"):
        raise ValueError(f"dii_scores: normalize={normalize!r}; choose none or area")
    if feats.dim() != 4:
        raise ValueError(f"dii_scores: `feats` must be [B, F, h, w], got {tuple(feats.shape)}")
    if logits_low.dim() != 4 or logits_low.shape[0] != feats.shape[0] or logits_low.shape[2:] != feats.shape[2:]:
        raise ValueError(
            f"dii_scores: `logits_low` {tuple(logits_low.shape)} must be [B, C, h, w] at the resolution of "
            f"`feats` {tuple(feats.shape)}"
        )
    if labels.dim() != 3 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f"dii_scores: `labels` must be [B={feats.shape[0]}, H, W], got {tuple(labels.shape)}")
    _check_device("dii_scores", "feats", feats, logits_low=logits_low, labels=labels, ref_weight=ref_weight,
                  ref_bias=ref_bias)
    B = feats.shape[0]
    step = B if not chunk_size or chunk_size <= 0 else chunk_size
    out = []
    for i in range(0, max(B, 1), step):
        delta = ce_grad_logits(logits_low[i : i + step], labels[i : i + step], ignore_index)
        f = feats[i : i + step].detach().flatten(2)
        if f.dtype == torch.float64:
            delta = delta.double()
        sc = ops.grad_dot(f, delta.flatten(2), ref_weight, ref_bias, backend=backend)
        if normalize == "area":
            area = foreground_area(logits_low[i : i + step], labels[i : i + step], ignore_index).to(sc)
            sc = sc / (area.unsqueeze(1) if sc.dim() == 2 else area)
        out.append(sc)
    return torch.cat(out) if len(out) > 1 else out[0]


def foreground_area(logits_low: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """[B] fraction of each image that is foreground, ``max(predicted, annotated)``, at least one pixel.

    Predicted: pixels of ``logits_low`` [B, C, h, w] whose argmax is not class 0; annotated: pixels of
    ``labels`` [B, H, W] neither 0 nor ``ignore_index``. Each as a fraction of its own map, so the two
    resolutions compare. The floor (one label pixel) keeps an image with no foreground at all finite.
    """
    pred = (logits_low.argmax(1) != 0).flatten(1).float().mean(1)
    ann = ((labels != 0) & (labels != ignore_index)).flatten(1).float().mean(1)
    floor = 1.0 / max(1, labels[0].numel()) if labels.shape[0] else 1.0
    return torch.maximum(pred, ann).clamp_min(floor)


# ------------------------------------------------------------------------------------------- gamma
def due(step: int, tau: int, warmup: int) -> bool:
    """Whether a gamma update follows network step ``step`` (1-based): ``step % tau == 0`` and ``step >= warmup``."""
    return step > 0 and step % tau == 0 and step >= warmup


class GammaState:
    """gamma and its (lazy) Adam state; lives on the CPU (a few thousand floats).

    ``optimizer``: ``adam`` (the paper) or ``scaled_sgd`` (not in the paper): gradient descent on the
    hypergradient divided by its root mean square over the images of the update, so that each gamma
    moves in proportion to its own score. Adam divides each image's step by that image's own score
    history: every gamma moves by about ``lr`` per update whether its score is large (a dropped
    annotation) or tiny (an annotation the network already agrees with). ``median_sgd`` (not in the
    paper): each gamma moves by ``lr * clip(h_k / median_j |h_j|, -step_clip, step_clip)``, in proportion
    to its own score against the update's typical one, clipped: scores divided by the foreground area
    (``dii.normalize=area``) are heavy-tailed, and an RMS (``scaled_sgd``) is set by the few largest."""

    def __init__(
        self,
        n_weak: int,
        init: float = 0.5,
        lr: float = 0.1,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip: Sequence[float] = (0.0, 1.0),
        optimizer: str = "adam",
        step_clip: float = 3.0,
    ):
        if optimizer not in ("adam", "scaled_sgd", "median_sgd"):
            raise ValueError(f"GammaState: optimizer={optimizer!r}; choose adam, scaled_sgd or median_sgd")
        if step_clip <= 0:
            raise ValueError(f"GammaState: step_clip={step_clip} must be positive")
        self.step_clip = float(step_clip)
        self.optimizer = optimizer
        self.n = int(n_weak)
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.clip = (float(clip[0]), float(clip[1]))
        self.gamma = torch.full((self.n,), float(init), dtype=torch.float32)
        self.exp_avg = torch.zeros(self.n, dtype=torch.float32)
        self.exp_avg_sq = torch.zeros(self.n, dtype=torch.float32)
        self.steps = torch.zeros(self.n, dtype=torch.int64)
        self.updates = 0

    def weights(self, weak_index: torch.Tensor) -> torch.Tensor:
        """Loss weights of a batch: 1 where ``weak_index`` is -1 (strong), else gamma."""
        wi = torch.as_tensor(weak_index).long().cpu()
        w = torch.ones(wi.shape, dtype=torch.float32)
        weak = wi >= 0
        w[weak] = self.gamma[wi[weak]]
        return w

    @torch.no_grad()
    def step(self, index: torch.Tensor, hypergrad: torch.Tensor, lr_scale: float = 1.0) -> None:
        """One Adam (or scaled SGD) step, descent on ``hypergrad``, on the entries ``index``, then clip.

        ``lr_scale`` multiplies the learning rate of this step (``dii.lr_schedule=poly``: the
        network's schedule factor, as the authors' code decays gamma's rate with the network's)."""
        idx = torch.as_tensor(index).long().cpu()
        g = torch.as_tensor(hypergrad, dtype=torch.float32).cpu()
        if self.optimizer == "median_sgd":
            med = float(g.abs().median()) if g.numel() else 0.0
            if med > 0:
                x = (g / med).clamp_(-self.step_clip, self.step_clip)
                self.gamma[idx] = (self.gamma[idx] - self.lr * float(lr_scale) * x).clamp_(*self.clip)
            self.steps[idx] += 1
            self.updates += 1
            return
        if self.optimizer == "scaled_sgd":
            rms = float(g.double().square().mean().sqrt()) if g.numel() else 0.0
            if rms > 0:
                self.gamma[idx] = (self.gamma[idx] - self.lr * float(lr_scale) * g / rms).clamp_(*self.clip)
            self.steps[idx] += 1
            self.updates += 1
            return
        b1, b2 = self.betas
        m = self.exp_avg[idx].mul_(b1).add_(g, alpha=1 - b1)
        v = self.exp_avg_sq[idx].mul_(b2).addcmul_(g, g, value=1 - b2)
        t = self.steps[idx] + 1
        bc1 = 1 - b1 ** t.double()
        bc2 = 1 - b2 ** t.double()
        step_size = (self.lr * float(lr_scale) / bc1).float()
        denom = (v.sqrt() / bc2.sqrt().float()).add_(self.eps)
        p = self.gamma[idx] - step_size * m / denom
        self.exp_avg[idx], self.exp_avg_sq[idx], self.steps[idx] = m, v, t
        self.gamma[idx] = p.clamp_(*self.clip)
        self.updates += 1

    def checksum(self) -> float:
        # position-weighted, so a permutation of gammas between images changes it too
        w = torch.arange(1, self.n + 1, dtype=torch.float64)
        return float((self.gamma.double() * w).sum()) if self.n else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma.clone(), "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone(),
                "steps": self.steps.clone(), "updates": self.updates}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["gamma"].numel() != self.n:
            raise ValueError(f"checkpoint has {sd['gamma'].numel()} gammas, this dataset has {self.n} weak images")
        self.gamma = sd["gamma"].float().clone()
        self.exp_avg = sd["exp_avg"].float().clone()
        self.exp_avg_sq = sd["exp_avg_sq"].float().clone()
        self.steps = sd["steps"].long().clone()
        self.updates = int(sd["updates"])


# ----------------------------------------------------------------------------------------- gamma.csv
GAMMA_CSV_COLUMNS = ("weak_index", "dataset_index", "image", "gamma", "true_quality")


def write_gamma_csv(path: str | os.PathLike, gamma: GammaState, train_ds: Any) -> None:
    """A run's ``gamma.csv``: one row per weak image in weak rank order (``weak_index``), with its
    dataset index, image path, final gamma and the weak mask's true quality (nan when unknown).
    Written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(GAMMA_CSV_COLUMNS)
        for k, i in enumerate(train_ds.weak_indices):
            w.writerow([k, int(i), train_ds.image_paths[int(i)], f"{float(gamma.gamma[k]):.6f}",
                        f"{float(train_ds.quality[int(i)]):.6f}"])
    os.replace(tmp, path)


def read_gamma_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(gamma, true quality)`` per weak rank from a run's ``gamma.csv`` (:func:`write_gamma_csv`):
    two float64 arrays indexed by ``weak_index``; quality nan where unknown."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    g = np.zeros(len(rows), dtype=np.float64)
    q = np.full(len(rows), math.nan, dtype=np.float64)
    for r in rows:
        k = int(r["weak_index"])
        g[k] = float(r["gamma"])
        if r.get("true_quality") not in (None, ""):
            q[k] = float(r["true_quality"])
    return g, q


# ------------------------------------------------------------------ gamma's reports and history
def gamma_quality(gamma: GammaState, quality: np.ndarray) -> dict[str, float]:
    """``{"dii/spearman_quality": rho}``: Spearman(gamma, true quality of each weak mask) over the weak
    masks whose quality the data knows (simulated weak masks); ``{}`` when it is undefined."""
    from .metrics import spearman

    rho = spearman(gamma.gamma.numpy(), np.asarray(quality, dtype=np.float64))
    return {} if math.isnan(rho) else {"dii/spearman_quality": rho}


def describe_update(step: int, stats: dict[str, float]) -> str:
    """The log line of one gamma update (:meth:`DIIUpdater.update`'s stats, with :func:`gamma_quality`'s)."""
    rho = stats.get("dii/spearman_quality")
    return (f"step {step}: gamma update, mean {stats['dii/gamma_mean']:.3f} std {stats['dii/gamma_std']:.3f}, "
            f"{100 * stats['dii/score_pos_frac']:.0f}% positive scores, "
            f"strong-set foreground excess {stats['dii/strong_fg_excess']:+.3f}"
            + (f", Spearman(gamma, true IoU) {rho:.3f}" if rho is not None else "")
            + f" ({stats['dii/seconds_strong'] + stats['dii/seconds_scan']:.1f} s)")


def append_gamma_history(path: Path, step: int, gamma: torch.Tensor, scores: torch.Tensor | None = None) -> None:
    """Add the snapshot after the DII update at ``step`` to ``<run>/gamma_history.npz``.

    Arrays ``step`` [U], ``gamma`` [U, n_weak] (weak rank order, as gamma.csv) and ``score``
    [U, n_weak]: the scores s_k = g_S . g_k that drove each update (NaN for an image not scanned
    at that update; the hypergradient is -s_k), for studying the update rule offline. Rows at or
    after ``step`` are dropped first: a resumed run redoes them. Rewritten whole (atomically) at each
    update; at the paper's scale (11k weak images, ~50 updates) that is a few MB every tau steps.
    """
    n = len(gamma)
    steps, rows = np.zeros(0, dtype=np.int64), np.zeros((0, n), dtype=np.float32)
    score_rows = np.zeros((0, n), dtype=np.float32)
    if path.is_file():
        with np.load(path) as f:
            keep = f["step"] < step
            steps, rows = f["step"][keep], f["gamma"][keep]
            score_rows = f["score"][keep] if "score" in f else np.full(rows.shape, np.nan, dtype=np.float32)
    steps = np.append(steps, np.int64(step))
    rows = np.concatenate([rows, gamma.detach().cpu().numpy().astype(np.float32)[None]])
    s = np.full((1, n), np.nan, dtype=np.float32) if scores is None else \
        torch.as_tensor(scores).detach().cpu().numpy().astype(np.float32).reshape(1, n)
    score_rows = np.concatenate([score_rows, s])
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, step=steps, gamma=rows, score=score_rows)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- the gamma update
def _forward_features(model: nn.Module, x: torch.Tensor, autocast) -> Any:
    with autocast():
        return model(x, return_features=True)


def _shifted(logits: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    return logits if shift is None else logits + shift.to(logits).view(1, -1, 1, 1)


def _loader(dataset: Dataset | ScanCache, indices: Sequence[int], batch_size: int, num_workers: int):
    """Batches (dicts with ``image`` and ``mask``) of the dataset items ``indices``, in order."""
    if isinstance(dataset, ScanCache):
        return dataset.batches(indices, batch_size, num_workers)
    return DataLoader(Subset(dataset, list(map(int, indices))), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers)


class ScanCache:
    """The items a gamma update reads (``image`` and ``mask`` of the strong and weak training images,
    through the eval transform: the same tensors at every update), kept in memory after their first
    load, up to ``max_bytes`` per process; those beyond it are loaded again at each update.

    Every update reads each strong and weak image once per network, a decode and resize each: on the `cpu`
    suite's DII + DCR runs (hybrid CVC-ClinicDB at 96x128, two networks, 406 images) 2.1 s of a 14.2 s
    update on the 2-core dev machine (``benchmarks/bench_dii_update.py``, benchmarks/RESULTS.md section 5).
    The batches are the ones a ``DataLoader`` over the same indices would give, with the same values (masks
    are stored as uint8 where the labels fit, and returned as int64), so the scores do not change.
    ``num_workers`` loads the items not yet cached.
    """

    def __init__(self, dataset: Dataset, max_bytes: int):
        self.dataset = dataset
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: dict[int, tuple[torch.Tensor, torch.Tensor, torch.dtype]] = {}

    @property
    def cached(self) -> int:
        """How many items are held."""
        return len(self._items)

    def _store(self, index: int, image: torch.Tensor, mask: torch.Tensor) -> None:
        if index in self._items:
            return
        small = (mask.dtype in (torch.int64, torch.int32, torch.int16) and mask.numel() > 0
                 and 0 <= int(mask.min()) and int(mask.max()) <= 255)
        kept = mask.to(torch.uint8) if small else mask.clone()
        size = image.numel() * image.element_size() + kept.numel() * kept.element_size()
        if self.nbytes + size > self.max_bytes:
            return
        self._items[index] = (image.clone(), kept, mask.dtype)
        self.nbytes += size

    def _stream(self, missing: list[int], batch_size: int, num_workers: int):
        """(index or None, image, mask) of the items ``missing``, in order, loaded from the dataset."""
        if not missing:
            return
        for batch in _loader(self.dataset, missing, batch_size, num_workers):
            for j in range(batch["image"].shape[0]):
                yield (int(batch["index"][j]) if "index" in batch else None), batch["image"][j], batch["mask"][j]

    def batches(self, indices: Sequence[int], batch_size: int, num_workers: int = 0):
        """Batches of ``batch_size`` items (the last one smaller) of ``indices``, in order."""
        indices = [int(i) for i in indices]
        load = [i not in self._items for i in indices]  # per position: cached items stay cached
        stream = self._stream([i for i, miss in zip(indices, load) if miss], batch_size, num_workers)
        for start in range(0, len(indices), batch_size):
            images, masks = [], []
            for i, miss in zip(indices[start:start + batch_size], load[start:start + batch_size]):
                if miss:
                    index, image, mask = next(stream)
                    if index is not None and index != i:
                        raise RuntimeError(f"ScanCache: the dataset returned item {index} where {i} was asked for")
                    self._store(i, image, mask)
                else:
                    image, kept, dtype = self._items[i]
                    mask = kept.to(dtype)
                images.append(image)
                masks.append(mask)
            yield {"image": torch.stack(images), "mask": torch.stack(masks)}


def _soft_targets(labels: torch.Tensor, num_classes: int, size: Sequence[int], ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [B, H, W] at the classifier's resolution ``size``: class fractions per cell [B, C, h, w]
    (valid pixels only) and pixel weights [B, 1, h, w] summing to 1 per image (an image's loss is the
    mean over its valid pixels)."""
    valid = labels != ignore_index
    onehot = F.one_hot(torch.where(valid, labels, 0).long(), num_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    frac = F.adaptive_avg_pool2d(onehot, tuple(size))
    cover = F.adaptive_avg_pool2d(valid[:, None].float(), tuple(size))
    weight = cover / cover.sum((2, 3), keepdim=True).clamp_min(1e-12)
    return frac / cover.clamp_min(1e-12), weight


@torch.no_grad()
def calibrate_logits(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int],
    accelerator: Any,
    batch_size: int,
    ignore_index: int = 255,
    autocast=contextlib.nullcontext,
    num_workers: int = 0,
    iterations: int = 50,
    max_shift: float = 12.0,
    with_excess: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, float]:
    """The per-class logit offset [C] (mean zero) that minimises the strong images' loss when added to
    the classifier's bias: the network's best recalibration on the strong set, the same on every process.

    For ``dii.score=calibrated`` (not in the paper). At the offset, the strong set's predicted and
    true class fractions agree, so g_S no longer carries "more (or less) of this class everywhere",
    and scores taken at the offset do not change at all when the network's bias moves. It does not
    stop the score flips measured on hybrid CVC-ClinicDB (benchmarks/RESULTS.md, section 5): there
    the network over-predicts at the polyps' boundaries, not everywhere, and an offset cannot undo
    that. With ``with_excess`` also returns the strong set's predicted minus true foreground fraction
    before the offset (the ``dii/strong_fg_excess`` of the other scores). Newton's method on the convex loss
    over the offset, from the logits at the classifier's resolution and the labels averaged onto it
    (one pass over the strong images; the sums are reduced across processes at each iteration)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    C = model.classifier.weight.shape[0]
    zs, ys, ws = [], [], []
    for batch in (_loader(dataset, list(indices)[rank::world], batch_size, num_workers) if len(indices) else []):
        out = _forward_features(model, batch["image"].to(device), autocast)
        frac, weight = _soft_targets(batch["mask"].to(device), C, out.logits_low.shape[-2:], ignore_index)
        zs.append(out.logits_low.double()), ys.append(frac.double()), ws.append(weight.double())
    z = torch.cat(zs) if zs else torch.zeros(0, C, 1, 1, dtype=torch.float64, device=device)
    y = torch.cat(ys) if ys else torch.zeros_like(z)
    w = torch.cat(ws) if ws else torch.zeros(0, 1, 1, 1, dtype=torch.float64, device=device)
    shift = torch.zeros(C, dtype=torch.float64, device=device)
    excess = None
    for _ in range(iterations):
        p = torch.softmax(z + shift.view(1, C, 1, 1), 1)
        pw = (p * w).permute(0, 2, 3, 1).reshape(-1, C)
        stats = torch.cat([((p - y) * w).sum((0, 2, 3)), (torch.diag(pw.sum(0)) - pw.T @ p.permute(0, 2, 3, 1).reshape(-1, C)).flatten()])
        if world > 1:
            stats = accelerator.reduce(stats, reduction="sum")
        grad, hess = stats[:C], stats[C:].view(C, C)
        if excess is None:  # at zero offset: the network's own foreground excess, mean over strong images
            excess = float(grad[1:].sum()) / max(1, len(indices))
        if float(grad.abs().max()) < 1e-9 * max(1, len(indices)):
            break
        eye = torch.eye(C, dtype=hess.dtype, device=device)
        step = torch.linalg.solve(hess + 1e-6 * max(1, len(indices)) * eye, grad)
        step = step / max(1.0, float(step.abs().max()))  # at most 1 per class and iteration: Newton from
        # far off (saturated probabilities, a tiny Hessian) would overshoot
        shift = (shift - step).clamp(-max_shift, max_shift)
        shift = shift - shift.mean()  # only differences between classes matter
    if with_excess:
        return shift.float(), (0.0 if excess is None else excess)
    return shift.float()


@torch.no_grad()
def reference_grad(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int],
    accelerator: Any,
    batch_size: int,
    ignore_index: int = 255,
    autocast=contextlib.nullcontext,
    num_workers: int = 0,
    feature_mean: bool = False,
    logit_shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """``g_S`` = gradient of the mean loss over the strong images ``indices`` (global list) w.r.t. the
    classifier (weight [C, F], bias [C]), fp32, identical on every process.

    With ``feature_mean`` also returns the classifier input averaged over the strong images' pixels
    ([F]; each image's spatial mean, averaged over images), for :func:`centred_reference`. A
    ``logit_shift`` [C] (:func:`calibrate_logits`) is added to the logits first, as if to the bias."""
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    cls = model.classifier
    gW = torch.zeros(cls.weight.shape[:2], dtype=torch.float32, device=device)
    gb = torch.zeros(cls.weight.shape[0], dtype=torch.float32, device=device)
    hsum = torch.zeros(cls.weight.shape[1], dtype=torch.float32, device=device)
    local = list(indices)[rank::world]
    if local:
        for batch in _loader(dataset, local, batch_size, num_workers):
            x = batch["image"].to(device)
            y = batch["mask"].to(device)
            out = _forward_features(model, x, autocast)
            w, b = classifier_grad(out.feats, _shifted(out.logits_low, logit_shift), y, ignore_index)
            n = x.shape[0]  # classifier_grad averages over its batch: back to a sum
            gW += w.float() * n
            gb += b.float() * n
            if feature_mean:
                hsum += out.feats.float().mean((2, 3)).sum(0)
    if world > 1:
        gW = accelerator.reduce(gW, reduction="sum")
        gb = accelerator.reduce(gb, reduction="sum")
        if feature_mean:
            hsum = accelerator.reduce(hsum, reduction="sum")
    total = max(1, len(indices))
    if feature_mean:
        return gW / total, gb / total, hsum / total
    return gW / total, gb / total


def centred_reference(gW: torch.Tensor, gb: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference ``(A, -A c)`` that makes :func:`weak_scores` return the centred score.

    ``dii.score=centred`` (not in the paper): the classifier gradients are taken about a feature
    centre ``c`` and without the bias, ``G^c = sum_p delta[:, p] (h[:, p] - c)^T = G - g_b c^T``, and
    ``s_k = <G_k^c, G_S^c>``. With ``A = G_S^c``, ``sum_p delta_k[:, p] . (A h_k[:, p] - A c)`` equals
    ``<A, G_k - g_b,k c^T>``, so the fused op computes it unchanged. Centring removes the part of
    both gradients that only says "more (or less) of this class everywhere", which from random
    weights dominates the paper's score (benchmarks/RESULTS.md, section 5)."""
    A = gW - gb.unsqueeze(1) * c.to(gW).unsqueeze(0)
    return A, -(A @ c.to(gW))


@torch.no_grad()
def weak_scores(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int],
    ref: tuple[torch.Tensor, torch.Tensor],
    accelerator: Any,
    batch_size: int,
    ignore_index: int = 255,
    autocast=contextlib.nullcontext,
    num_workers: int = 0,
    logit_shift: torch.Tensor | None = None,
    normalize: str = "none",
) -> torch.Tensor:
    """``s_k = <g_k, g_ref>`` for the dataset items ``indices`` (global list), sharded across
    processes and gathered: returns a CPU float32 tensor aligned with ``indices`` on every process.
    ``logit_shift`` as in :func:`reference_grad`; ``normalize`` as in :func:`dii_scores`."""
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    n = len(indices)
    per = math.ceil(n / world) if n else 0
    positions = list(range(rank, n, world))
    local_scores = torch.zeros(per, dtype=torch.float32, device=device)
    local_pos = torch.full((per,), -1, dtype=torch.int64, device=device)  # -1: padding (equal shapes to gather)
    local_pos[: len(positions)] = torch.as_tensor(positions, dtype=torch.int64, device=device)
    W, b = ref
    k = 0
    if positions:
        for batch in _loader(dataset, [indices[p] for p in positions], batch_size, num_workers):
            x = batch["image"].to(device)
            y = batch["mask"].to(device)
            out = _forward_features(model, x, autocast)
            s = dii_scores(out.feats, _shifted(out.logits_low, logit_shift), y, W, b, ignore_index,
                           normalize=normalize)
            local_scores[k:k + s.shape[0]] = s.float()
            k += s.shape[0]
    if world > 1:
        all_scores = accelerator.gather(local_scores).cpu()
        all_pos = accelerator.gather(local_pos).cpu()
    else:
        all_scores, all_pos = local_scores.cpu(), local_pos.cpu()
    out = torch.zeros(n, dtype=torch.float32)
    keep = all_pos >= 0
    out[all_pos[keep]] = all_scores[keep]
    return out


class DIIUpdater:
    """Runs one gamma update: strong reference gradient, weak scan, Adam step (see the module doc).

    ``dataset`` must be the training split without augmentation (the eval transform), with weak
    images carrying their weak masks; ``strong_indices`` / ``weak_indices`` are its dataset indices.
    ``batch_size`` is the training batch size per process (``train.batch_size``): the size of one of
    the ``dii.strong_batches`` batches drawn for g_S on each process. ``cache_bytes`` > 0 keeps up to that
    many bytes of the loaded items in memory between updates (:class:`ScanCache`; ``dii.scan_cache_mib``).
    """

    def __init__(
        self,
        gamma: GammaState,
        dataset: Dataset,
        strong_indices: np.ndarray,
        weak_indices: np.ndarray,
        cfg: Any,
        seed: int,
        ignore_index: int = 255,
        batch_size: int = 8,
        num_workers: int = 0,
        cache_bytes: int = 0,
    ):
        self.gamma = gamma
        # the eval-transformed items every update reads, kept between updates (ScanCache) when cache_bytes > 0
        self.dataset = ScanCache(dataset, cache_bytes) if cache_bytes > 0 else dataset
        self.strong_indices = np.asarray(strong_indices)
        self.weak_indices = np.asarray(weak_indices)
        self.cfg = cfg  # a DIIConfig
        self.seed = seed
        self.ignore_index = ignore_index
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.last_scores: torch.Tensor | None = None  # every weak rank's score at the last update (NaN: not scanned)

    def strong_set(self, step: int, world: int) -> list[int]:
        """Global list of strong items for g_S: all, or ``strong_batches`` batches drawn for this step."""
        n = len(self.strong_indices)
        k = self.cfg.strong_batches
        if k <= 0:
            return self.strong_indices.tolist()
        want = k * self.batch_size * world
        g = make_generator(self.seed, "dii-strong", step)
        reps = math.ceil(want / n)
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:want]
        return self.strong_indices[order.numpy()].tolist()

    def scan_set(self, step: int) -> np.ndarray:
        """Weak ranks (0..n_weak-1) scanned at this update."""
        n = len(self.weak_indices)
        if self.cfg.scan == "all" or self.cfg.scan_size >= n:
            return np.arange(n)
        g = make_generator(self.seed, "dii-scan", step)
        return np.sort(torch.randperm(n, generator=g)[: self.cfg.scan_size].numpy())

    def _scores(self, model: nn.Module, strong: list[int], ranks: np.ndarray, accelerator: Any, autocast) -> tuple:
        """One network's scores s_k for the weak ranks ``ranks`` against its own g_S on ``strong``, with its
        g_S statistics and the seconds of the strong pass and of the scan."""
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            centred = self.cfg.score == "centred"
            shift, excess = None, None
            if self.cfg.score == "calibrated":
                shift, excess = calibrate_logits(model, self.dataset, strong, accelerator, self.cfg.scan_batch_size,
                                                 self.ignore_index, autocast, self.num_workers, with_excess=True)
            ref = reference_grad(model, self.dataset, strong, accelerator, self.cfg.scan_batch_size,
                                 self.ignore_index, autocast, self.num_workers, feature_mean=centred,
                                 logit_shift=shift)
            g_w, g_b = ref[0], ref[1]  # g_S, logged before any centring
            if centred:
                ref = centred_reference(*ref)
            elif self.cfg.score == "weight":  # the authors' code: the classifier weight's gradient only
                ref = (g_w, torch.zeros_like(g_b))
            t1 = time.perf_counter()
            scores = weak_scores(model, self.dataset, self.weak_indices[ranks].tolist(), ref, accelerator,
                                 self.cfg.scan_batch_size, self.ignore_index, autocast, self.num_workers,
                                 logit_shift=shift, normalize=getattr(self.cfg, "normalize", "none"))
        finally:
            model.train(was_training)
        return scores, (g_w, g_b, shift, excess), (t1 - t0, time.perf_counter() - t1)

    def update(
        self, model: nn.Module | Sequence[nn.Module], accelerator: Any, step: int, autocast=contextlib.nullcontext,
        lr_scale: float = 1.0
    ) -> dict:
        """One gamma update. ``model`` is one network, or several (``dii.networks=both``): then s_k is the
        sum of each network's score against its own g_S, the one-step hypergradient of gamma when gamma
        weights every network's weak loss and the strong losses are summed. The logged g_S statistics are
        the first network's."""
        models = [model] if isinstance(model, nn.Module) else list(model)
        strong = self.strong_set(step, accelerator.num_processes)  # the same draw for every network
        ranks = self.scan_set(step)
        per_net = [self._scores(net, strong, ranks, accelerator, autocast) for net in models]
        scores = torch.stack([s for s, _, _ in per_net]).sum(0)
        g_w, g_b, shift, excess = per_net[0][1]
        t_strong = sum(t[0] for _, _, t in per_net)
        t_scan = sum(t[1] for _, _, t in per_net)
        self.gamma.step(torch.as_tensor(ranks), -scores, lr_scale)  # hypergradient = -s_k
        self.last_scores = torch.full((self.gamma.n,), float("nan"))
        self.last_scores[torch.as_tensor(ranks).long()] = scores
        return {
            "dii/score_mean": float(scores.mean()) if scores.numel() else 0.0,
            "dii/score_pos_frac": float((scores > 0).float().mean()) if scores.numel() else 0.0,
            "dii/gamma_mean": float(self.gamma.gamma.mean()),
            "dii/gamma_std": float(self.gamma.gamma.std()) if self.gamma.n > 1 else 0.0,
            "dii/g_s_norm": float(torch.sqrt((g_w ** 2).sum() + (g_b ** 2).sum())),
            # g_S's bias part is mean(p - onehot) per class: summed over the foreground classes it is
            # the predicted minus the true foreground fraction on the strong set (class 0 = background).
            # Positive (the network over-predicts foreground) makes an all-background weak mask score
            # positive whatever its quality: see benchmarks/RESULTS.md, section 5, diagnostics.
            # (dii.score=calibrated: before the offset, or it would read 0 by construction)
            "dii/strong_fg_excess": float(g_b[1:].sum()) if excess is None else excess,
            # dii.score=calibrated: the offset added to the foreground logits (minus the background's)
            "dii/calibration_shift": float(shift[1:].mean() - shift[0]) if shift is not None else 0.0,
            "dii/seconds_strong": t_strong,
            "dii/seconds_scan": t_scan,
            "dii/scanned": int(len(ranks)),
            "dii/lr": self.gamma.lr * float(lr_scale),
        }
