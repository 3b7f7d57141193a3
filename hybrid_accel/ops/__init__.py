"""The two fused ops of hybrid_accel, nothing else.

- :func:`grad_dot`: the per-instance final-layer gradient dot products of DII (built on it:
  ``hybrid_accel.dii.dii_scores`` and ``classifier_grad``);
- :func:`foreground_paste`: the foreground paste mixing of DCR, and its two halves :func:`paste_mask`
  and :func:`mix_with_mask` (built on them: ``hybrid_accel.dcr.make_mix`` and ``pseudo_labels``).

Each op has a compiled implementation (``hybrid_accel._C``, registered with the dispatcher under the
``hybrid_accel`` namespace: C++/OpenMP on the CPU, CUDA on GPUs, with fake kernels in ``_ext``) and a
pure-PyTorch twin (``_ref``). The backend is chosen per call:

- ``backend=None`` / ``"auto"``: the compiled op when it is built for the tensors' device, else the twin;
- ``backend="ext"``: the compiled op, or an error that says how to build it;
- ``backend="torch"``: the twin.

The environment variable ``HYBRID_ACCEL_BACKEND`` (auto/ext/torch) sets the default. This package
imports nothing from hybrid_accel outside it but the compiled extension ``hybrid_accel._C``.
"""

from __future__ import annotations

import os

import torch

from . import _ref
from ._ext import EXT_ERROR, ext_has_kernel, extension_available, require_extension

__all__ = [
    "grad_dot",
    "foreground_paste",
    "paste_mask",
    "mix_with_mask",
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
def _check_label_map(name: str, t: torch.Tensor, op: str, B: int | None = None, H: int | None = None,
                     W: int | None = None) -> None:
    _check_rank(name, t, (3,), "[B, H, W]", op)
    if B is not None and tuple(t.shape) != (B, H, W):
        raise ValueError(f"{op}: `{name}` {tuple(t.shape)} must be [B={B}, H={H}, W={W}] to match `x_i`")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{op}: `{name}` must be an integer label map, got {t.dtype}")


def _check_cls(cls: torch.Tensor, B: int, op: str) -> None:
    if cls.dim() != 1 or cls.shape[0] != B:
        raise ValueError(f"{op}: `cls` must be [B={B}], got {tuple(cls.shape)}")
    if cls.dtype.is_floating_point or cls.dtype == torch.bool:
        raise TypeError(f"{op}: `cls` must be an integer tensor, got {cls.dtype}")


def _check_paste_inputs(x_i, x_j, preds, op, y_i=None, cls=None, mask=None):
    """The checks of the paste op's arguments: the label map ``y_i`` and ``cls`` (``foreground_paste``)
    or a given ``mask`` (``mix_with_mask``)."""
    _check_float("x_i", x_i, op)
    _check_float("x_j", x_j, op)
    _check_rank("x_i", x_i, (4,), "[B, K, H, W]", op)
    if x_j.shape != x_i.shape:
        raise ValueError(f"{op}: `x_j` {tuple(x_j.shape)} must have the shape of `x_i` {tuple(x_i.shape)}")
    if x_j.dtype != x_i.dtype:
        raise TypeError(f"{op}: `x_j` dtype {x_j.dtype} must equal `x_i` dtype {x_i.dtype}")
    B, _, H, W = x_i.shape
    if y_i is not None:
        _check_label_map("y_i", y_i, op, B, H, W)
    if cls is not None:
        _check_cls(cls, B, op)
    if mask is not None:
        _check_rank("mask", mask, (3,), "[B, H, W]", op)
        if tuple(mask.shape) != (B, H, W):
            raise ValueError(f"{op}: `mask` {tuple(mask.shape)} must be [B={B}, H={H}, W={W}] to match `x_i`")
        if mask.dtype != torch.bool:
            raise TypeError(f"{op}: `mask` must be a bool tensor, got {mask.dtype}")
    p0 = preds[0][1]
    for name, p in preds:
        _check_float(name, p, op)
        _check_rank(name, p, (4,), "[B, C, H, W]", op)
        if p.shape[0] != B or p.shape[2:] != (H, W) or p.shape[1] != p0.shape[1]:
            raise ValueError(f"{op}: `{name}` {tuple(p.shape)} must be [B={B}, C, H={H}, W={W}] like `p1_i`")
        if p.dtype != p0.dtype:
            raise TypeError(f"{op}: `{name}` dtype {p.dtype} must equal `p1_i` dtype {p0.dtype}")
    _check_device(op, "x_i", x_i, x_j=x_j, y_i=y_i, cls=cls, mask=mask, **dict(preds))


def foreground_paste(x_i, x_j, y_i, cls, p1_i, p1_j, p2_i, p2_j, backend: str | None = None):
    """DCR foreground paste in one pass (DESIGN.md section 3).

    ``B = (y_i == cls)`` per sample (``cls < 0``: empty), ``x_m = B x_i + (1 - B) x_j``, and the hard
    pseudo labels ``argmax(B p(x_i) + (1 - B) p(x_j))`` of both networks (logits or probabilities).
    Ignore-value pixels never match a class (``cls`` is a real class index or -1).

    Returns ``(x_m [B,K,H,W], mask bool [B,H,W], y1_m int64 [B,H,W], y2_m int64 [B,H,W])``.
    Its two halves are also callable alone: :func:`paste_mask` (the mask only, e.g. before a forward
    pass) and :func:`mix_with_mask` (the mixed image and pseudo labels for any given mask).
    """
    op = "foreground_paste"
    preds = [("p1_i", p1_i), ("p1_j", p1_j), ("p2_i", p2_i), ("p2_j", p2_j)]
    _check_paste_inputs(x_i, x_j, preds, op, y_i=y_i, cls=cls)
    y_i = y_i.long()
    cls = cls.long()
    if resolve_backend(backend, op, x_i.device) == "ext":
        return tuple(torch.ops.hybrid_accel.foreground_paste(x_i, x_j, y_i, cls, p1_i, p1_j, p2_i, p2_j))
    return _ref.foreground_paste_ref(x_i, x_j, y_i, cls, p1_i, p1_j, p2_i, p2_j)


def paste_mask(y_i: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """The mask of :func:`foreground_paste` alone: ``B = (y_i == cls)`` per sample, bool [B, H, W].

    ``y_i`` [B, H, W] integer labels, ``cls`` [B] integer (``cls < 0``: an empty mask). Always the
    pure-PyTorch twin (a comparison; the fused op is for the whole paste).
    """
    op = "paste_mask"
    _check_label_map("y_i", y_i, op)
    _check_cls(cls, y_i.shape[0], op)
    _check_device(op, "y_i", y_i, cls=cls)
    return _ref.paste_mask_ref(y_i, cls)


def mix_with_mask(x_i, x_j, mask, p1_i, p1_j, p2_i, p2_j):
    """The outputs of :func:`foreground_paste` for a given bool ``mask`` [B, H, W] instead of ``(y_i, cls)``.

    ``x_m = B x_i + (1 - B) x_j`` and both networks' hard pseudo labels ``argmax(B p(x_i) + (1 - B) p(x_j))``;
    returns ``(x_m, mask, y1_m, y2_m)``. Always the pure-PyTorch twin.
    """
    op = "mix_with_mask"
    preds = [("p1_i", p1_i), ("p1_j", p1_j), ("p2_i", p2_i), ("p2_j", p2_j)]
    _check_paste_inputs(x_i, x_j, preds, op, mask=mask)
    return _ref.mix_with_mask_ref(x_i, x_j, mask, p1_i, p1_j, p2_i, p2_j)
