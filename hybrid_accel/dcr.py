"""Dynamic Co-Regularisation (DESIGN.md section 3) and the single-network loss.

Per step, ``(x_i, y_i)`` comes from the primary sampler and ``(x_j, y_j)`` from the auxiliary one.
The loss per pair is::

    w_i * l1(x_i, y_i) + w_j * l2(x_j, y_j) + lambda * (w_i + w_j) / 2 * r,
    r = l1(x_m, y~_2m) + l2(x_m, y~_1m)

with ``w`` = 1 for strong images and gamma for weak ones (under DII), ``l1``/``l2`` the per-instance
cross-entropy of network 1/2 (ignore value excluded) and ``y~`` the hard pseudo labels of the other
network, averaged over the batch.

Order of operations (one forward pass per network over ``cat[x_i, x_j, x_m]``): the mixed image
``x_m`` must exist *before* the forward, while the pseudo labels need the forward's outputs. So
:func:`make_mix` first builds the paste mask ``B`` and ``x_m`` (``B = (y_i == c)`` for a class ``c``
drawn per sample by :func:`choose_paste_class`, ``ops.paste_mask`` + ``torch.where``); after the
forward, :func:`pseudo_labels` calls the fused ``ops.foreground_paste`` with the detached predictions
on ``x_i`` and ``x_j``: it recomputes the same mask from ``(y_i, c)`` and returns the pseudo labels
(its ``x_m`` output is the one already built; the extra write is negligible next to the forward).
For the CutMix ablation the box mask (:func:`cutmix_mask`) is drawn before the forward and the
pseudo labels come from ``ops.mix_with_mask`` with that mask (:func:`cutmix_paste` does both).

Supervision (``method.dcr_supervision``): ``split`` is Eq. 7 as written (network 1 learns ``x_i``,
network 2 ``x_j``); ``both`` is the authors' code, each network learns both images,
``w_i l1(x_i) + w_j l1(x_j)`` (and the same for network 2), averaged over the 2B images.

The paper trains with lambda = 4 from the first step, without a ramp. The trainer's defaults (see
``hybrid_accel.config``) warm both parts up instead: ``method.strong_warmup`` trains both networks on the
exact masks alone (:func:`warmup_loss`, no mixing) for that many steps before weak images and this loss
come in, and ``method.lambda_warmup`` then ramps lambda linearly from 0 to ``method.dcr_weight``,
``dcr_weight * min(1, (step - strong_warmup) / lambda_warmup)``; 0 turns either off, as
``configs/polyp-paper.yaml`` does. The trainer computes the ramp; :func:`dcr_loss` takes the ramped
value as ``lambda_``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import ops
from .losses import per_instance_ce, per_instance_kl, weighted_mean

__all__ = ["Mix", "make_mix", "pseudo_labels", "dcr_loss", "dcr_forward", "single_loss", "warmup_loss",
           "choose_paste_class", "cutmix_mask", "cutmix_paste", "SUPERVISION"]

SUPERVISION = ("split", "both")


class Mix(NamedTuple):
    x_m: torch.Tensor  # [B, K, H, W] mixed images
    mask: torch.Tensor  # [B, H, W] bool, True where x_m comes from x_i
    cls: torch.Tensor  # [B] pasted class (-1: none), or all -1 for CutMix


def choose_paste_class(
    y: torch.Tensor, num_classes: int, ignore_index: int = 255, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per sample, a class drawn uniformly among the non-background classes present in ``y``.

    Ignore-value pixels never count. Returns int64 [B]; -1 where no foreground class is present.
    """
    if y.dim() != 3:
        raise ValueError(f"choose_paste_class: `y` must be [B, H, W], got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"choose_paste_class: `y` must be an integer label map, got {y.dtype}")
    if num_classes < 2:
        raise ValueError(f"choose_paste_class: num_classes must be >= 2, got {num_classes}")
    B = y.shape[0]
    yl = y.reshape(B, -1).long()
    valid = (yl >= 0) & (yl < num_classes) & (yl != ignore_index)
    # one bincount over (sample, class) pairs: a [B, C] presence table without a Python loop
    flat = (torch.arange(B, device=y.device).unsqueeze(1) * num_classes + yl)[valid]
    present = torch.bincount(flat, minlength=B * num_classes).view(B, num_classes) > 0
    present[:, 0] = False
    n = present.sum(dim=1)
    u = torch.rand(B, generator=generator, device="cpu" if generator is None else generator.device).to(y.device)
    pick = torch.minimum((u * n).long(), (n - 1).clamp(min=0))  # index among present classes
    rank = present.long().cumsum(dim=1) - 1  # rank of each present class
    hit = present & (rank == pick.unsqueeze(1))
    cls = torch.where(n > 0, hit.long().argmax(dim=1), torch.full_like(n, -1))
    return cls


def cutmix_mask(
    B: int,
    H: int,
    W: int,
    area=(0.25, 0.5),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The CutMix ablation's mask: per sample one random box, bool [B, H, W] on ``device``.

    The box covers a fraction of the image drawn uniformly from ``area``, with the image's aspect ratio.
    """
    dev = "cpu" if generator is None else generator.device
    frac = area[0] + (area[1] - area[0]) * torch.rand(B, generator=generator, device=dev)
    side = frac.sqrt()
    bh = (side * H).round().long().clamp(1, H)
    bw = (side * W).round().long().clamp(1, W)
    top = (torch.rand(B, generator=generator, device=dev) * (H - bh + 1)).long()
    left = (torch.rand(B, generator=generator, device=dev) * (W - bw + 1)).long()
    rows = torch.arange(H).view(1, H, 1)
    cols = torch.arange(W).view(1, 1, W)
    mask = (
        (rows >= top.view(B, 1, 1)) & (rows < (top + bh).view(B, 1, 1))
        & (cols >= left.view(B, 1, 1)) & (cols < (left + bw).view(B, 1, 1))
    )
    return mask.to(device) if device is not None else mask


def cutmix_paste(x_i, x_j, p1_i, p1_j, p2_i, p2_j, area=(0.25, 0.5), generator: torch.Generator | None = None):
    """The CutMix ablation: the same outputs as ``ops.foreground_paste`` with a :func:`cutmix_mask` box
    as the mask, ``(x_m, mask, y1_m, y2_m)``."""
    B, _, H, W = x_i.shape
    mask = cutmix_mask(B, H, W, area, generator, x_i.device)
    return ops.mix_with_mask(x_i, x_j, mask, p1_i, p1_j, p2_i, p2_j)


def make_mix(
    x_i: torch.Tensor,
    x_j: torch.Tensor,
    y_i: torch.Tensor,
    num_classes: int,
    paste: str = "foreground",
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
) -> Mix:
    """Paste mask and mixed image, before any forward pass."""
    B, _, H, W = x_i.shape
    if paste == "foreground":
        cls = choose_paste_class(y_i, num_classes, ignore_index, generator).to(y_i.device)
        mask = ops.paste_mask(y_i, cls)
    elif paste == "cutmix":
        mask = cutmix_mask(B, H, W, generator=generator, device=x_i.device)
        cls = torch.full((B,), -1, dtype=torch.long, device=x_i.device)
    else:
        raise ValueError(f"paste must be foreground or cutmix, got {paste!r}")
    x_m = torch.where(mask.unsqueeze(1), x_i, x_j)
    return Mix(x_m, mask, cls)


@torch.no_grad()
def pseudo_labels(
    mix: Mix,
    x_i: torch.Tensor,
    x_j: torch.Tensor,
    y_i: torch.Tensor,
    p1_i: torch.Tensor,
    p1_j: torch.Tensor,
    p2_i: torch.Tensor,
    p2_j: torch.Tensor,
    paste: str = "foreground",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo labels ``(y~_1m, y~_2m)`` of networks 1 and 2 on ``x_m`` (detached)."""
    p = [t.detach() for t in (p1_i, p1_j, p2_i, p2_j)]
    if paste == "foreground":
        _, _, y1, y2 = ops.foreground_paste(x_i, x_j, y_i, mix.cls, *p)
    else:
        _, _, y1, y2 = ops.mix_with_mask(x_i, x_j, mix.mask, *p)
    return y1, y2


def _soft_mixed(mask: torch.Tensor, p_i: torch.Tensor, p_j: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(1)
    return torch.where(m, p_i.detach().float().softmax(1), p_j.detach().float().softmax(1))


def dcr_loss(
    out1: torch.Tensor,
    out2: torch.Tensor,
    y_i: torch.Tensor,
    y_j: torch.Tensor,
    w_i: torch.Tensor,
    w_j: torch.Tensor,
    mix: Mix,
    x_i: torch.Tensor,
    x_j: torch.Tensor,
    lambda_: float = 4.0,
    paste: str = "foreground",
    pseudo_loss: str = "ce",
    ignore_index: int = 255,
    supervision: str = "split",
    band_i: torch.Tensor | None = None,
    band_j: torch.Tensor | None = None,
    band_fill: str = "ignore",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DCR loss from both networks' logits over ``cat[x_i, x_j, x_m]`` ([3B, C, H, W] each).

    ``band_i``/``band_j`` (bool [B, H, W], optional): pixels where the labels are unsure
    (``data.weak_boundary_band``). With ``band_fill="peer"`` each network's supervised target there is
    the other network's hard prediction on the same image (detached); with ``"ignore"`` there is none.
    The paste and the pseudo labels use the whole labels. Returns the scalar loss and detached parts
    for logging.
    """
    B = y_i.shape[0]
    o1_i, o1_j, o1_m = out1.split(B)
    o2_i, o2_j, o2_m = out2.split(B)
    if band_fill == "peer":
        # network 1 is taught network 2's answer in the band and the reverse (separate targets per network)
        y1 = (peer_fill(y_i, band_i, o2_i), peer_fill(y_j, band_j, o2_j))
        y2 = (peer_fill(y_i, band_i, o1_i), peer_fill(y_j, band_j, o1_j))
        sup1 = _supervised(o1_i, o1_j, o2_i, o2_j, *y1, w_i, w_j, supervision, ignore_index)[0]
        sup2 = _supervised(o1_i, o1_j, o2_i, o2_j, *y2, w_i, w_j, supervision, ignore_index)[1]
    elif band_fill == "ignore":  # without a band: the labels as they are
        ys = (band_ignored(y_i, band_i, ignore_index), band_ignored(y_j, band_j, ignore_index))
        sup1, sup2 = _supervised(o1_i, o1_j, o2_i, o2_j, *ys, w_i, w_j, supervision, ignore_index)
    else:
        raise ValueError(f"band_fill must be ignore or peer, got {band_fill!r}")
    w_i = w_i.to(sup1)
    w_j = w_j.to(sup1)
    if pseudo_loss == "ce":
        y1m, y2m = pseudo_labels(mix, x_i, x_j, y_i, o1_i, o1_j, o2_i, o2_j, paste)
        r1 = per_instance_ce(o1_m, y2m, ignore_index)  # network 1 learns network 2's pseudo mask
        r2 = per_instance_ce(o2_m, y1m, ignore_index)
    elif pseudo_loss == "kl":
        r1 = per_instance_kl(o1_m, _soft_mixed(mix.mask, o2_i, o2_j))
        r2 = per_instance_kl(o2_m, _soft_mixed(mix.mask, o1_i, o1_j))
    else:
        raise ValueError(f"pseudo_loss must be ce or kl, got {pseudo_loss!r}")
    r = r1 + r2
    reg = weighted_mean(r, (w_i + w_j) / 2)
    loss = sup1 + sup2 + lambda_ * reg
    parts = {"loss/sup1": sup1.detach(), "loss/sup2": sup2.detach(), "loss/reg": reg.detach(),
             "loss/total": loss.detach()}
    return loss, parts


def band_ignored(y: torch.Tensor, band: torch.Tensor | None, ignore_index: int = 255) -> torch.Tensor:
    """``y`` with the pixels of ``band`` set to ``ignore_index`` (no band: ``y`` itself)."""
    return y if band is None else y.masked_fill(band.to(y.device, non_blocking=True), ignore_index)


@torch.no_grad()
def peer_fill(y: torch.Tensor, band: torch.Tensor | None, peer_logits: torch.Tensor) -> torch.Tensor:
    """``y`` with the pixels of ``band`` set to the class the peer network predicts there."""
    if band is None or not bool(band.any()):
        return y
    return torch.where(band, peer_logits.detach().argmax(1).to(y.dtype), y)


def _supervised(o1_i, o1_j, o2_i, o2_j, y_i, y_j, w_i, w_j, supervision: str, ignore_index: int):
    """Weighted supervised losses of networks 1 and 2 (``o2_i``/``o1_j`` unused under ``split``)."""
    if supervision == "split":
        return (weighted_mean(per_instance_ce(o1_i, y_i, ignore_index), w_i),
                weighted_mean(per_instance_ce(o2_j, y_j, ignore_index), w_j))
    if supervision != "both":
        raise ValueError(f"supervision must be one of {SUPERVISION}, got {supervision!r}")
    y, w = torch.cat([y_i, y_j]), torch.cat([w_i, w_j])
    return (weighted_mean(per_instance_ce(torch.cat([o1_i, o1_j]), y, ignore_index), w),
            weighted_mean(per_instance_ce(torch.cat([o2_i, o2_j]), y, ignore_index), w))


def warmup_loss(
    net1: Any,
    net2: Any,
    x_i: torch.Tensor,
    x_j: torch.Tensor,
    y_i: torch.Tensor,
    y_j: torch.Tensor,
    w_i: torch.Tensor,
    w_j: torch.Tensor,
    supervision: str = "split",
    ignore_index: int = 255,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The supervised part of :func:`dcr_loss` alone, without the mixed image (``method.strong_warmup``).

    Under ``split`` each network sees only its own batch (2B image passes in all, not 6B)."""
    B = y_i.shape[0]
    if supervision == "split":
        o1_i, o2_j = net1(x_i), net2(x_j)
        o1_j = o2_i = None
    else:
        x = torch.cat([x_i, x_j])
        o1_i, o1_j = net1(x).split(B)
        o2_i, o2_j = net2(x).split(B)
    sup1, sup2 = _supervised(o1_i, o1_j, o2_i, o2_j, y_i, y_j, w_i, w_j, supervision, ignore_index)
    loss = sup1 + sup2
    return loss, {"loss/sup1": sup1.detach(), "loss/sup2": sup2.detach(), "loss/total": loss.detach()}


def single_loss(
    logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor, ignore_index: int = 255
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted cross-entropy of one network (every baseline without DCR)."""
    loss = weighted_mean(per_instance_ce(logits, y, ignore_index), w)
    return loss, {"loss/sup1": loss.detach(), "loss/total": loss.detach()}


def dcr_forward(net1: Any, net2: Any, x_i: torch.Tensor, x_j: torch.Tensor, mix: Mix) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward per network over ``cat[x_i, x_j, x_m]``."""
    x = torch.cat([x_i, x_j, mix.x_m], dim=0)
    return net1(x), net2(x)

