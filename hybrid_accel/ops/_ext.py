"""Loading the compiled extension and registering its fake (meta) kernels."""

from __future__ import annotations

import os

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the repository (a C++ compiler is needed; "
    "for the CUDA kernels also nvcc, e.g. CUDA_HOME=/usr/local/cuda, and HYBRID_ACCEL_BUILD_CUDA=1 to insist). "
    "See README.md, section 'Building the extension'."
)

_C = None
EXT_ERROR: str | None = None
if os.environ.get("HYBRID_ACCEL_NO_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
    # lets a user (or a test) run the pure-PyTorch path with a built extension present
    EXT_ERROR = "disabled by HYBRID_ACCEL_NO_EXT"
else:
    try:  # the import registers the ops with the dispatcher (TORCH_LIBRARY in csrc/)
        from .. import _C  # noqa: F401
    except ImportError as exc:  # no compiler at install time, or HYBRID_ACCEL_SKIP_EXT=1
        EXT_ERROR = f"{type(exc).__name__}: {exc}"

_OPS = ("grad_dot", "foreground_paste")


def extension_available() -> bool:
    """True when ``hybrid_accel._C`` imported and its ops are registered."""
    return _C is not None


def ext_has_kernel(op: str, device: torch.device) -> bool:
    """Whether the compiled op has a kernel for this device type (CUDA kernels are optional)."""
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"hybrid_accel::{op}", key)


def require_extension(op: str, device: torch.device) -> None:
    if _C is None:
        raise RuntimeError(
            f"hybrid_accel.ops.{op}: backend 'ext' was requested but the compiled extension "
            f"hybrid_accel._C is not available ({EXT_ERROR}); {BUILD_HINT} "
            "Or use backend='torch' / HYBRID_ACCEL_BACKEND=torch for the pure-PyTorch implementation."
        )
    if not ext_has_kernel(op, device):
        raise RuntimeError(
            f"hybrid_accel.ops.{op}: the compiled extension has no kernel for device "
            f"'{torch.device(device).type}' (was it built without CUDA?); {BUILD_HINT}"
        )


if _C is not None:
    # Fakes are registered only when the library loaded, so a compiler-less install stays importable.
    def _same_device_fake(op, *tensors):
        # a meta tensor mixed with CPU ones must fail here too, not yield uninitialised CPU memory
        devs = {t.device for t in tensors if t is not None}
        torch._check(len(devs) <= 1, lambda: f"{op}: inputs on different devices ({sorted(map(str, devs))}); "
                                             "move them to one device")

    @torch.library.register_fake("hybrid_accel::grad_dot")
    def _grad_dot_fake(feats, grad_logits, ref_weight, ref_bias):
        _same_device_fake("grad_dot", feats, grad_logits, ref_weight, ref_bias)
        torch._check(feats.dim() == 3, lambda: "grad_dot: feats must be [B, F, P]")
        torch._check(ref_weight.dim() == 3, lambda: "grad_dot: ref_weight must be [R, C, F]")
        out_dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
        return feats.new_empty((feats.shape[0], ref_weight.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("hybrid_accel::foreground_paste")
    def _foreground_paste_fake(x_i, x_j, y_i, cls, p1_i, p1_j, p2_i, p2_j):
        _same_device_fake("foreground_paste", x_i, x_j, y_i, cls, p1_i, p1_j, p2_i, p2_j)
        B, _, H, W = x_i.shape
        return (
            torch.empty_like(x_i, memory_format=torch.contiguous_format),
            x_i.new_empty((B, H, W), dtype=torch.bool),
            x_i.new_empty((B, H, W), dtype=torch.long),
            x_i.new_empty((B, H, W), dtype=torch.long),
        )
