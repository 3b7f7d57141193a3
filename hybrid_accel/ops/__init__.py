"""The two fused ops of hybrid_accel and the DII / DCR helpers built on them.

Each op has a compiled implementation (``hybrid_accel._C``, registered with the dispatcher under the
``hybrid_accel`` namespace: C++/OpenMP on the CPU, CUDA on GPUs) and a pure-PyTorch twin
(``hybrid_accel.ops._ref``). The backend is chosen per call:

- ``backend=None`` / ``"auto"``: the compiled op when it is built for the tensors' device, else the twin;
- ``backend="ext"``: the compiled op, or an error that says how to build it;
- ``backend="torch"``: the twin.

The environment variable ``HYBRID_ACCEL_BACKEND`` (auto/ext/torch) sets the default.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..losses import per_instance_ce
from . import _ref
from ._ext import EXT_ERROR, ext_has_kernel, extension_available, require_extension

__all__ = [
    "grad_dot",
    "foreground_paste",
    "choose_paste_class",
    "cutmix_paste",
    "ce_grad_logits",
    "classifier_grad",
    "dii_scores",
    "resolve_backend",
    "extension_available",
    "EXT_ERROR",
]

_BACKENDS = ("auto", "ext", "torch")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def resolve_backend(backend: str | None, op: str, device: torch.device) -> str:
    """Return "ext" or "torch" for this call (see the module docstring)."""
    choice = backend or os.environ.get("HYBRID_ACCEL_BACKEND", "auto") or "auto"
    choice = choice.lower()
    if choice not in _BACKENDS:
        raise ValueError(
            f"unknown backend {choice!r} for hybrid_accel.ops.{op}: use one of {_BACKENDS} "
            "(argument `backend` or environment variable HYBRID_ACCEL_BACKEND)"
        )
    if choice == "torch":
        return "torch"
    if choice == "ext":
        require_extension(op, device)
        return "ext"
    return "ext" if ext_has_kernel(op, device) else "torch"


def _check_float(name: str, t: torch.Tensor, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: `{name}` must be float32, bfloat16, float16 or float64, got {t.dtype}")


def _check_rank(name: str, t: torch.Tensor, ranks: tuple[int, ...], shape_doc: str, op: str) -> None:
    if t.dim() not in ranks:
        raise ValueError(f"{op}: `{name}` must have shape {shape_doc}, got a {t.dim()}-d tensor {tuple(t.shape)}")


def _check_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; move them to one device")


# --------------------------------------------------------------------------------------------- grad_dot
def grad_dot(
    feats: torch.Tensor,
    grad_logits: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-instance final-layer gradient dot products, without per-sample gradients.

    For a 1x1-conv classifier ``z = W h + b``, instance k's gradient is ``(delta_k h_k^T, sum_p delta_k)``.
    Returns ``s[k, r] = sum_p grad_logits[k,:,p] . (ref_weight[r] @ feats[k,:,p] + ref_bias[r])``.

    Args:
        feats: [B, F, P] classifier inputs (float32/bfloat16/float16/float64; any strides).
        grad_logits: [B, C, P] d l_k / d z_k (same dtype as ``feats``, or float32).
        ref_weight: [C, F] or [R, C, F] reference weight gradient(s).
        ref_bias: optional [C] or [R, C] reference bias gradient(s).
    Returns:
        [B] (2-d ``ref_weight``) or [B, R], float32 (float64 for float64 inputs).
    """
    op = "grad_dot"
    _check_float("feats", feats, op)
    _check_float("grad_logits", grad_logits, op)
    _check_float("ref_weight", ref_weight, op)
    _check_rank("feats", feats, (3,), "[B, F, P]", op)
    _check_rank("grad_logits", grad_logits, (3,), "[B, C, P]", op)
    _check_rank("ref_weight", ref_weight, (2, 3), "[C, F] or [R, C, F]", op)
    _check_device(op, "feats", feats, grad_logits=grad_logits, ref_weight=ref_weight, ref_bias=ref_bias)
    squeeze = ref_weight.dim() == 2
    W = ref_weight.unsqueeze(0) if squeeze else ref_weight
    B, Fc, P = feats.shape
    R, C, Fw = W.shape
    if grad_logits.shape[0] != B or grad_logits.shape[2] != P:
        raise ValueError(
            f"{op}: `grad_logits` {tuple(grad_logits.shape)} must be [B={B}, C, P={P}] to match `feats` {tuple(feats.shape)}"
        )
    if grad_logits.shape[1] != C or Fw != Fc:
        raise ValueError(
            f"{op}: `ref_weight` {tuple(ref_weight.shape)} must be [C={grad_logits.shape[1]}, F={Fc}] "
            f"(or [R, C, F]) to match `grad_logits` and `feats`"
        )
    if grad_logits.dtype not in (feats.dtype, _ref._acc_dtype(feats.dtype)):
        raise TypeError(
            f"{op}: `grad_logits` dtype {grad_logits.dtype} must equal `feats` dtype {feats.dtype} "
            f"or be {_ref._acc_dtype(feats.dtype)}"
        )
    b = None
    if ref_bias is not None:
        _check_float("ref_bias", ref_bias, op)
        expect = (C,) if squeeze else (R, C)
        if tuple(ref_bias.shape) != expect:
            raise ValueError(f"{op}: `ref_bias` must have shape {list(expect)} to match `ref_weight`, got {tuple(ref_bias.shape)}")
        b = ref_bias.reshape(R, C)
    acc = _ref._acc_dtype(feats.dtype)
    W = W.to(acc)
    b = b.to(acc) if b is not None else None
    if resolve_backend(backend, op, feats.device) == "ext":
        out = torch.ops.hybrid_accel.grad_dot(feats, grad_logits, W.contiguous(), None if b is None else b.contiguous())
    else:
        out = _ref.grad_dot_ref(feats, grad_logits, W, b)
    return out.squeeze(1) if squeeze else out


# ------------------------------------------------------------------------------------- foreground paste
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


def _check_paste_inputs(x_i, x_j, y_i, cls, preds, op):
    _check_float("x_i", x_i, op)
    _check_float("x_j", x_j, op)
    _check_rank("x_i", x_i, (4,), "[B, K, H, W]", op)
    if x_j.shape != x_i.shape:
        raise ValueError(f"{op}: `x_j` {tuple(x_j.shape)} must have the shape of `x_i` {tuple(x_i.shape)}")
    if x_j.dtype != x_i.dtype:
        raise TypeError(f"{op}: `x_j` dtype {x_j.dtype} must equal `x_i` dtype {x_i.dtype}")
    B, _, H, W = x_i.shape
    _check_rank("y_i", y_i, (3,), "[B, H, W]", op)
    if tuple(y_i.shape) != (B, H, W):
        raise ValueError(f"{op}: `y_i` {tuple(y_i.shape)} must be [B={B}, H={H}, W={W}] to match `x_i`")
    if y_i.dtype.is_floating_point or y_i.dtype == torch.bool:
        raise TypeError(f"{op}: `y_i` must be an integer label map, got {y_i.dtype}")
    if cls is not None:
        if cls.dim() != 1 or cls.shape[0] != B:
            raise ValueError(f"{op}: `cls` must be [B={B}], got {tuple(cls.shape)}")
        if cls.dtype.is_floating_point or cls.dtype == torch.bool:
            raise TypeError(f"{op}: `cls` must be an integer tensor, got {cls.dtype}")
    p0 = preds[0][1]
    for name, p in preds:
        _check_float(name, p, op)
        _check_rank(name, p, (4,), "[B, C, H, W]", op)
        if p.shape[0] != B or p.shape[2:] != (H, W) or p.shape[1] != p0.shape[1]:
            raise ValueError(f"{op}: `{name}` {tuple(p.shape)} must be [B={B}, C, H={H}, W={W}] like `p1_i`")
        if p.dtype != p0.dtype:
            raise TypeError(f"{op}: `{name}` dtype {p.dtype} must equal `p1_i` dtype {p0.dtype}")
    _check_device(op, "x_i", x_i, x_j=x_j, y_i=y_i, cls=cls, **dict(preds))


def foreground_paste(x_i, x_j, y_i, cls, p1_i, p1_j, p2_i, p2_j, backend: str | None = None):
    """DCR foreground paste in one pass (DESIGN.md section 3).

    ``B = (y_i == cls)`` per sample (``cls < 0``: empty), ``x_m = B x_i + (1 - B) x_j``, and the hard
    pseudo labels ``argmax(B p(x_i) + (1 - B) p(x_j))`` of both networks (logits or probabilities).
    Ignore-value pixels never match a class (``cls`` is a real class index or -1).

    Returns ``(x_m [B,K,H,W], mask bool [B,H,W], y1_m int64 [B,H,W], y2_m int64 [B,H,W])``.
    """
    op = "foreground_paste"
    preds = [("p1_i", p1_i), ("p1_j", p1_j), ("p2_i", p2_i), ("p2_j", p2_j)]
    _check_paste_inputs(x_i, x_j, y_i, cls, preds, op)
    y_i = y_i.long()
    cls = cls.long()
    if resolve_backend(backend, op, x_i.device) == "ext":
        return tuple(torch.ops.hybrid_accel.foreground_paste(x_i, x_j, y_i, cls, p1_i, p1_j, p2_i, p2_j))
    return _ref.foreground_paste_ref(x_i, x_j, y_i, cls, p1_i, p1_j, p2_i, p2_j)


def cutmix_paste(x_i, x_j, p1_i, p1_j, p2_i, p2_j, area=(0.25, 0.5), generator: torch.Generator | None = None):
    """The CutMix ablation: the same outputs as ``foreground_paste`` with a random box as the mask.

    The box covers a fraction of the image drawn uniformly from ``area``, with the image's aspect ratio.
    """
    op = "cutmix_paste"
    preds = [("p1_i", p1_i), ("p1_j", p1_j), ("p2_i", p2_i), ("p2_j", p2_j)]
    B, _, H, W = x_i.shape
    _check_paste_inputs(x_i, x_j, torch.zeros(B, H, W, dtype=torch.long, device=x_i.device), None, preds, op)
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
    ).to(x_i.device)
    return _ref.mix_with_mask_ref(x_i, x_j, mask, p1_i, p1_j, p2_i, p2_j)


# ------------------------------------------------------------------------------------------ DII helpers
def ce_grad_logits(logits_low: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """delta_k = d l_k / d z_k for every instance, at the classifier's resolution, in float32.

    ``l_k`` is instance k's pixel-wise cross-entropy (mean over its valid pixels) of the logits
    upsampled bilinearly (align_corners=False) to the labels' size. Instances are independent, so one
    backward pass of ``sum_k l_k`` yields every instance's own gradient. Call it under ``no_grad`` (not
    ``inference_mode``); it enables autograd locally on a detached copy.
    """
    if logits_low.dim() != 4:
        raise ValueError(f"ce_grad_logits: `logits_low` must be [B, C, h, w], got {tuple(logits_low.shape)}")
    if labels.dim() != 3 or labels.shape[0] != logits_low.shape[0]:
        raise ValueError(
            f"ce_grad_logits: `labels` must be [B={logits_low.shape[0]}, H, W], got {tuple(labels.shape)}"
        )
    _check_device("ce_grad_logits", "logits_low", logits_low, labels=labels)
    acc = _ref._acc_dtype(logits_low.dtype)
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
) -> torch.Tensor:
    """Per-instance scores ``s_k = <grad_theta' l_k, g_ref>`` for the final 1x1 classifier.

    ``feats`` [B, F, h, w] and ``logits_low`` [B, C, h, w] come from one forward pass; ``labels``
    [B, H, W] are at image resolution (ignore value allowed). The DII hypergradient is ``-s_k``.
    Instances are processed ``chunk_size`` at a time (None: all at once), which bounds the memory of
    the full-resolution cross-entropy gradient without changing any result.
    Returns [B] (or [B, R] for a stacked [R, C, F] reference), float32.
    """
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
        out.append(grad_dot(f, delta.flatten(2), ref_weight, ref_bias, backend=backend))
    return torch.cat(out) if len(out) > 1 else out[0]
