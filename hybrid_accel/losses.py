"""Per-instance segmentation losses (DESIGN.md sections 2 and 3).

Every loss here returns one value per instance so that the trainer can weight instances (DII):
``l_k`` = mean over the valid (non-ignore) pixels of instance k of a pixel-wise loss, and 0 for
an instance without any valid pixel. The batch loss is ``sum_k w_k l_k / B``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["per_instance_ce", "weighted_ce", "per_instance_kl", "weighted_mean"]


def _check(logits: torch.Tensor, target_shape: torch.Size, what: str) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, C, H, W], got {tuple(logits.shape)}")
    if tuple(target_shape) != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"{what} of shape {tuple(target_shape)} does not match logits {tuple(logits.shape)} "
            "(expected [B, H, W] at the logits' resolution)"
        )


def _mean_over_valid(pixel_loss: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, H, W] losses (already 0 where invalid) -> [B] means over valid pixels, 0 if none."""
    count = valid.flatten(1).sum(1)
    total = pixel_loss.flatten(1).sum(1)
    return total / count.clamp(min=1).to(total.dtype)


def per_instance_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy per instance: [B, C, H, W] logits, [B, H, W] int64 labels -> [B] float32.

    Pixels labelled ``ignore_index`` contribute nothing; an instance with no labelled pixel
    gets 0 (and a zero gradient).
    """
    _check(logits, target.shape, "target")
    # Float32 whatever the autocast dtype: the per-instance means feed the DII weights.
    pix = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    return _mean_over_valid(pix, target != ignore_index)


def weighted_mean(per_instance: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_k w_k l_k / B`` (the plain mean when ``weights`` is None)."""
    if weights is None:
        return per_instance.mean()
    weights = weights.to(per_instance)
    if weights.shape != per_instance.shape:
        raise ValueError(f"weights {tuple(weights.shape)} do not match losses {tuple(per_instance.shape)}")
    return (weights * per_instance).sum() / per_instance.shape[0]


def weighted_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Weighted batch cross-entropy ``sum_k w_k l_k / B`` with ``l_k`` from :func:`per_instance_ce`."""
    return weighted_mean(per_instance_ce(logits, target, ignore_index), weights)


def per_instance_kl(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL divergence ``KL(p_target || softmax(logits))`` per instance, for the pseudo-label ablation.

    Args:
        logits: [B, C, H, W] logits of the network being regularised.
        target: either soft targets [B, C, H, W] (probabilities, for example the other network's
            detached softmax), or hard labels [B, H, W] (then KL equals cross-entropy, since a
            one-hot target has zero entropy).
        ignore_index: for hard labels, pixels to leave out.
        valid: optional [B, H, W] bool mask of the pixels that count (soft targets).

    Returns:
        [B] float32: mean over valid pixels of the per-pixel KL; 0 for an instance without any.
    """
    if target.dim() == 3 and not target.is_floating_point():
        if valid is not None:
            target = target.masked_fill(~valid, ignore_index)
        return per_instance_ce(logits, target, ignore_index)
    if target.shape != logits.shape:
        raise ValueError(f"soft target {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    logq = F.log_softmax(logits.float(), dim=1)
    p = target.float()
    # xlogy gives 0 for p = 0 (no NaN from 0 * log 0).
    pix = (torch.special.xlogy(p, p) - p * logq).sum(1)
    if valid is None:
        valid = torch.ones_like(pix, dtype=torch.bool)
    else:
        _check(logits, valid.shape, "valid mask")
        pix = pix * valid
    return _mean_over_valid(pix, valid)
