"""The fused ops against their pure-PyTorch twins and by hand, and on bad input.

(``dii_scores`` / ``classifier_grad`` against explicit per-sample gradients: tests/test_dii.py;
``choose_paste_class`` and the CutMix box: tests/test_dcr.py.)

CPU tests always run; CUDA tests run where a GPU is present (marker ``cuda``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hybrid_accel import ops
from hybrid_accel.dcr import choose_paste_class
from hybrid_accel.ops import _ref

HAS_EXT = ops.extension_available()
HAS_CUDA = torch.cuda.is_available()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="compiled extension hybrid_accel._C not built")
cuda = pytest.mark.skipif(not (HAS_CUDA and HAS_EXT and ops._ext.ext_has_kernel("grad_dot", "cuda")),
                          reason="needs a CUDA device and the CUDA kernels")

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda])]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, g, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------- grad_dot
GD_SHAPES = [  # (B, F, C, P, R): odd sizes, P not a multiple of any block or vector width
    (3, 37, 3, 101, 1),
    (2, 16, 2, 17, 3),
    (1, 5, 2, 1, 1),
    (4, 64, 3, 1029, 2),
    (2, 9, 7, 515, 1),  # R * C > the kernels' row tile
]


def _grad_dot_case(shape, dtype, device, bias, seed, grad_fp32=False):
    B, Fc, C, P, R = shape
    g = _gen(seed)
    feats = _rand(B, Fc, P, g=g, dtype=dtype, device=device)
    grad = _rand(B, C, P, g=g, dtype=torch.float32 if grad_fp32 else dtype, device=device)
    acc = _ref._acc_dtype(dtype)
    W = _rand(R, C, Fc, g=g, dtype=acc, device=device)
    b = _rand(R, C, g=g, dtype=acc, device=device) if bias else None
    return feats, grad, W, b


def _truth(feats, grad, W, b):
    return _ref.grad_dot_ref(feats.double(), grad.double(), W.double(), None if b is None else b.double())


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GD_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_grad_dot_ext_matches_twin(device, dtype, shape, bias):
    feats, grad, W, b = _grad_dot_case(shape, dtype, device, bias, seed=hash((shape, bias)) % 1000)
    got = ops.grad_dot(feats, grad, W, b, backend="ext")
    twin = ops.grad_dot(feats, grad, W, b, backend="torch")
    truth = _truth(feats, grad, W, b)
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[4])
    # Both accumulate in float32 from the same rounded inputs: the kernel's error against the fp64
    # truth must stay within about twice the twin's (STYLE.md), plus a floor for float32 round-off.
    scale = truth.abs().max().item() + 1e-12
    err_ext = (got.double() - truth).abs().max().item() / scale
    err_twin = (twin.double() - truth).abs().max().item() / scale
    assert err_ext <= 2 * err_twin + 2e-6, (err_ext, err_twin)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_grad_dot_float64_and_mixed_grad_dtype(device):
    feats, grad, W, b = _grad_dot_case((3, 20, 3, 77, 2), torch.float64, device, True, seed=1)
    got = ops.grad_dot(feats, grad, W, b, backend="ext")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _truth(feats, grad, W, b), rtol=1e-12, atol=1e-12)
    # bfloat16 features with a float32 logit gradient (what dii_scores passes under autocast)
    feats, grad, W, b = _grad_dot_case((3, 20, 3, 77, 1), torch.bfloat16, device, True, seed=2, grad_fp32=True)
    got = ops.grad_dot(feats, grad, W, b, backend="ext")
    torch.testing.assert_close(got.double(), _truth(feats, grad, W, b), rtol=2e-5, atol=1e-4)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_grad_dot_2d_reference_and_noncontiguous(device):
    g = _gen(3)
    B, Fc, C, P = 3, 24, 2, 50
    # strided views: channels-last style feats and a sliced gradient
    feats = _rand(B, P, Fc, g=g, device=device).transpose(1, 2)
    grad = _rand(B, C, 2 * P, g=g, device=device)[:, :, ::2]
    assert not feats.is_contiguous() and not grad.is_contiguous()
    W = _rand(C, Fc, g=g, device=device)
    b = _rand(C, g=g, device=device)
    got = ops.grad_dot(feats, grad, W, b, backend="ext")
    assert got.shape == (B,)
    torch.testing.assert_close(got.double(), _truth(feats, grad, W.unsqueeze(0), b.unsqueeze(0)).squeeze(1),
                               rtol=1e-5, atol=1e-4)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_dot_misaligned_contiguous_views(device, dtype):
    """Contiguous views that start one element into their storage defeat 16-byte vector loads."""
    g = _gen(8)
    B, Fc, C, P = 3, 16, 3, 64
    feats = _rand(B * Fc * P + 1, g=g, dtype=dtype, device=device)[1:].view(B, Fc, P)
    grad = _rand(B * C * P + 1, g=g, dtype=dtype, device=device)[1:].view(B, C, P)
    W = _rand(1, C, Fc, g=g, device=device)
    got = ops.grad_dot(feats, grad, W, backend="ext")
    twin = ops.grad_dot(feats, grad, W, backend="torch")
    torch.testing.assert_close(got, twin, rtol=1e-5, atol=1e-4)


def test_grad_dot_twin_is_exact_in_float64():
    feats, grad, W, b = _grad_dot_case((2, 11, 3, 40, 2), torch.float64, "cpu", True, seed=4)
    s = ops.grad_dot(feats, grad, W, b, backend="torch")
    # the defining formula, instance by instance: sum_p delta_k[:, p] . (W_r h_k[:, p] + b_r)
    ref = torch.zeros(2, 2, dtype=torch.float64)
    for k in range(2):
        for r in range(2):
            z = W[r] @ feats[k] + b[r].unsqueeze(1)
            ref[k, r] = (grad[k] * z).sum()
    torch.testing.assert_close(s, ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ foreground paste
def _paste_case(B, K, C, H, W, dtype, pdtype, device, seed):
    g = _gen(seed)
    x_i = _rand(B, K, H, W, g=g, dtype=dtype, device=device)
    x_j = _rand(B, K, H, W, g=g, dtype=dtype, device=device)
    y = torch.randint(0, C, (B, H, W), generator=g)
    y[torch.rand(B, H, W, generator=g) < 0.2] = 255
    preds = [_rand(B, C, H, W, g=g, dtype=pdtype, device=device) for _ in range(4)]
    return x_i, x_j, y.to(device), preds


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("size", [(17, 19), (32, 32), (1, 3)])
def test_foreground_paste_ext_equals_twin(device, dtype, size):
    H, W = size
    B, K, C = 3, 3, 4
    x_i, x_j, y, preds = _paste_case(B, K, C, H, W, dtype, dtype, device, seed=H * W)
    cls = choose_paste_class(y, C, generator=_gen(0))
    cls[-1] = -1  # one sample with an empty mask
    got = ops.foreground_paste(x_i, x_j, y, cls, *preds, backend="ext")
    twin = ops.foreground_paste(x_i, x_j, y, cls, *preds, backend="torch")
    for a, b, name in zip(got, twin, ["x_m", "mask", "y1_m", "y2_m"]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    mask = got[1]
    assert not mask[-1].any()
    assert torch.equal(got[0][-1], x_j[-1])
    assert not (mask & (y == 255)).any(), "ignore pixels must never be pasted"


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_foreground_paste_mixed_dtypes_and_noncontiguous(device):
    B, K, C, H, W = 2, 3, 2, 12, 20
    x_i, x_j, y, preds = _paste_case(B, K, C, H, W, torch.bfloat16, torch.float32, device, seed=5)
    x_i = x_i.contiguous(memory_format=torch.channels_last)
    preds[1] = preds[1].transpose(2, 3).contiguous().transpose(2, 3)
    cls = torch.tensor([1, 1], device=device)
    got = ops.foreground_paste(x_i, x_j, y, cls, *preds, backend="ext")
    twin = ops.foreground_paste(x_i, x_j, y, cls, *preds, backend="torch")
    for a, b in zip(got, twin):
        assert torch.equal(a, b)


def test_foreground_paste_semantics_by_hand():
    x_i = torch.ones(1, 1, 2, 3)
    x_j = torch.zeros(1, 1, 2, 3)
    y = torch.tensor([[[0, 1, 2], [255, 1, 0]]])
    p_i = torch.tensor([[[[0.9, 0.1, 0.1], [0.1, 0.1, 0.9]], [[0.1, 0.9, 0.9], [0.9, 0.9, 0.1]]]])
    p_j = 1 - p_i
    for backend in ["torch"] + (["ext"] if HAS_EXT else []):
        x_m, mask, y1, y2 = ops.foreground_paste(x_i, x_j, y, torch.tensor([1]), p_i, p_j, p_j, p_i, backend=backend)
        assert mask.tolist() == [[[False, True, False], [False, True, False]]]
        assert x_m[0, 0].tolist() == [[0, 1, 0], [0, 1, 0]]
        # pasted pixels take the x_i prediction, the others the x_j prediction
        assert y1.tolist() == [[[1, 1, 0], [0, 1, 1]]]
        assert y2.tolist() == [[[0, 0, 1], [1, 0, 0]]]


def test_paste_mask_and_mix_with_mask_are_the_halves_of_the_paste():
    B, K, C, H, W = 3, 3, 4, 13, 17
    x_i, x_j, y, preds = _paste_case(B, K, C, H, W, torch.float32, torch.float32, "cpu", seed=6)
    cls = torch.tensor([1, 3, -1])
    mask = ops.paste_mask(y, cls)
    assert mask.dtype == torch.bool and mask.shape == (B, H, W)
    assert torch.equal(mask[0], y[0] == 1) and torch.equal(mask[1], y[1] == 3) and not mask[2].any()
    want = ops.foreground_paste(x_i, x_j, y, cls, *preds, backend="torch")
    got = ops.mix_with_mask(x_i, x_j, mask, *preds)
    for a, b, name in zip(got, want, ["x_m", "mask", "y1_m", "y2_m"]):
        assert torch.equal(a, b), name


def test_paste_mask_and_mix_with_mask_errors_name_the_argument():
    B, K, C, H, W = 2, 3, 2, 8, 8
    x = torch.randn(B, K, H, W)
    y = torch.zeros(B, H, W, dtype=torch.long)
    cls = torch.tensor([1, 1])
    m = torch.zeros(B, H, W, dtype=torch.bool)
    p = torch.randn(B, C, H, W)
    with pytest.raises(ValueError, match="`y_i`"):
        ops.paste_mask(y[0], cls)
    with pytest.raises(TypeError, match="`y_i`"):
        ops.paste_mask(y.float(), cls)
    with pytest.raises(ValueError, match="`cls`"):
        ops.paste_mask(y, cls[:1])
    with pytest.raises(ValueError, match="`mask`"):
        ops.mix_with_mask(x, x, m[:, :4], p, p, p, p)
    with pytest.raises(TypeError, match="`mask`"):
        ops.mix_with_mask(x, x, m.long(), p, p, p, p)
    with pytest.raises(ValueError, match="`x_j`"):
        ops.mix_with_mask(x, x[:, :2], m, p, p, p, p)
    with pytest.raises(ValueError, match="`p2_j`"):
        ops.mix_with_mask(x, x, m, p, p, p, p[:, :, :4])


# ------------------------------------------------------------------------------ opcheck and compile
@needs_ext
def test_opcheck_grad_dot():
    feats, grad, W, b = _grad_dot_case((2, 8, 3, 21, 2), torch.float32, "cpu", True, seed=9)
    torch.library.opcheck(torch.ops.hybrid_accel.grad_dot.default, (feats, grad, W, b))
    torch.library.opcheck(torch.ops.hybrid_accel.grad_dot.default, (feats, grad, W, None))


@needs_ext
def test_opcheck_foreground_paste():
    x_i, x_j, y, preds = _paste_case(2, 3, 3, 9, 11, torch.float32, torch.float32, "cpu", seed=10)
    cls = torch.tensor([1, -1])
    torch.library.opcheck(torch.ops.hybrid_accel.foreground_paste.default, (x_i, x_j, y, cls, *preds))


@needs_ext
@pytest.mark.slow
def test_torch_compile_fullgraph():
    feats, grad, W, b = _grad_dot_case((2, 8, 3, 21, 1), torch.float32, "cpu", True, seed=11)
    x_i, x_j, y, preds = _paste_case(2, 3, 3, 9, 11, torch.float32, torch.float32, "cpu", seed=12)
    cls = torch.tensor([1, 2])

    def step(feats, grad, W, b, x_i, x_j, y, cls, p1, p2, p3, p4):
        s = torch.ops.hybrid_accel.grad_dot(feats, grad, W, b)
        x_m, mask, y1, y2 = torch.ops.hybrid_accel.foreground_paste(x_i, x_j, y, cls, p1, p2, p3, p4)
        return s * 2, x_m + 1, mask, y1 + y2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (feats, grad, W, b, x_i, x_j, y, cls, *preds)
    for a, e in zip(compiled(*args), step(*args)):
        assert torch.equal(a, e)


# ------------------------------------------------------------------------------------------ bad input
def test_grad_dot_errors_name_the_argument():
    f = torch.randn(2, 4, 10)
    g = torch.randn(2, 3, 10)
    W = torch.randn(3, 4)
    with pytest.raises(ValueError, match="`feats`"):
        ops.grad_dot(f[0], g, W)
    with pytest.raises(ValueError, match="`grad_logits`"):
        ops.grad_dot(f, torch.randn(2, 3, 11), W)
    with pytest.raises(ValueError, match="`ref_weight`"):
        ops.grad_dot(f, g, torch.randn(3, 5))
    with pytest.raises(ValueError, match="`ref_bias`"):
        ops.grad_dot(f, g, W, torch.randn(4))
    with pytest.raises(TypeError, match="`feats`"):
        ops.grad_dot(f.long(), g, W)
    with pytest.raises(TypeError, match="`grad_logits`"):
        ops.grad_dot(f, g.half(), W)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.grad_dot(f, g, W, backend="cuda")
    if HAS_CUDA:
        with pytest.raises(ValueError, match="`grad_logits` is on"):
            ops.grad_dot(f, g.cuda(), W)


@needs_ext
def test_compiled_kernels_check_inputs_themselves():
    # direct dispatcher calls bypass the Python checks: the C++ TORCH_CHECKs must still name the argument
    with pytest.raises(RuntimeError, match="`grad_logits`"):
        torch.ops.hybrid_accel.grad_dot(torch.randn(2, 4, 10), torch.randn(3, 3, 10), torch.randn(1, 3, 4), None)
    with pytest.raises(RuntimeError, match="`y_i`"):
        x = torch.randn(1, 3, 4, 4)
        p = torch.randn(1, 2, 4, 4)
        torch.ops.hybrid_accel.foreground_paste(x, x, torch.zeros(1, 4, 5, dtype=torch.long),
                                                torch.tensor([1]), p, p, p, p)


def test_foreground_paste_errors_name_the_argument():
    B, K, C, H, W = 2, 3, 2, 8, 8
    x = torch.randn(B, K, H, W)
    y = torch.zeros(B, H, W, dtype=torch.long)
    cls = torch.tensor([1, 1])
    p = torch.randn(B, C, H, W)
    with pytest.raises(ValueError, match="`x_j`"):
        ops.foreground_paste(x, x[:, :2], y, cls, p, p, p, p)
    with pytest.raises(ValueError, match="`y_i`"):
        ops.foreground_paste(x, x, y[:, :4], cls, p, p, p, p)
    with pytest.raises(TypeError, match="`y_i`"):
        ops.foreground_paste(x, x, y.float(), cls, p, p, p, p)
    with pytest.raises(ValueError, match="`cls`"):
        ops.foreground_paste(x, x, y, cls[:1], p, p, p, p)
    with pytest.raises(ValueError, match="`p2_j`"):
        ops.foreground_paste(x, x, y, cls, p, p, p, p[:, :, :4])
    with pytest.raises(TypeError, match="`p1_j`"):
        ops.foreground_paste(x, x, y, cls, p, p.half(), p, p)
    with pytest.raises(ValueError, match="`x_i`"):
        ops.foreground_paste(x[0], x[0], y, cls, p, p, p, p)


def test_backend_selection_without_extension():
    """With the extension disabled, auto falls back to the twin and `ext` says how to build it."""
    code = (
        "import torch, hybrid_accel.ops as o\n"
        "assert not o.extension_available()\n"
        "f = torch.randn(2, 4, 9); g = torch.randn(2, 3, 9); W = torch.randn(3, 4)\n"
        "s = o.grad_dot(f, g, W)\n"
        "assert s.shape == (2,)\n"
        "try:\n"
        "    o.grad_dot(f, g, W, backend='ext')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = dict(os.environ, HYBRID_ACCEL_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pip install --no-build-isolation" in out.stdout
    env = dict(os.environ, HYBRID_ACCEL_BACKEND="torch")
    code2 = "import torch, hybrid_accel.ops as o; print(o.resolve_backend(None, 'grad_dot', torch.device('cpu')))"
    out = subprocess.run([sys.executable, "-c", code2], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "torch", out.stderr


@needs_ext
def test_auto_backend_prefers_compiled_on_cpu():
    assert ops.resolve_backend("auto", "grad_dot", torch.device("cpu")) == "ext"
    assert ops.resolve_backend("torch", "grad_dot", torch.device("cpu")) == "torch"
