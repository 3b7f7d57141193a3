"""Depthwise convolutions whose CPU backward pass is computed as forward depthwise convolutions.

On the CPU, PyTorch's backward of a depthwise convolution (``groups == in_channels == out_channels``)
is far slower than its forward where the kernel is larger than 3x3 or dilated (as an output stride of
16 makes the last stages of EfficientNet): on one thread, 24 images, the forward of a 5x5 layer over
[672, 6, 8] takes 1.3 ms and its weight gradient 30-35 ms; at dilation 2 over [1152, 6, 8], the input
gradient alone takes 45-75 ms (benchmarks/RESULTS.md section 2.4). Both gradients of a depthwise
convolution are themselves depthwise convolutions, computed here as such, at about a forward's cost:

- input gradient: the output gradient (spread out with zeros for a strided layer) correlated with the
  flipped kernel; used for dilated layers (on undilated ones PyTorch's kernel is as fast or faster);
- weight gradient: each (image, channel) plane of the padded input correlated with the same plane of
  the output gradient (a depthwise convolution over N x C channels whose kernel is the output gradient,
  with the layer's dilation as stride and its stride as dilation), summed over the images.

:func:`use_fast_depthwise` switches a model's depthwise ``nn.Conv2d`` and timm ``Conv2dSame`` modules
whose kernel is larger than 3x3 or dilated (every depthwise one with ``every_layer=True``) to this
backward. Parameters, state-dict keys and outputs stay as they are; on a GPU, or when no gradient is
needed, the modules run PyTorch's own convolution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same

__all__ = ["depthwise_conv2d", "use_fast_depthwise", "DepthwiseConv2d", "DepthwiseConv2dSame"]


def _input_grad(go: torch.Tensor, weight: torch.Tensor, shape: torch.Size, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """Gradient of ``conv2d(x, weight, stride, padding, dilation, groups=C)`` with respect to ``x``
    (of size ``shape``), given the output gradient ``go``, as a forward depthwise convolution."""
    n, c, h, w = shape
    kh, kw = weight.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = go.shape[-2:]
    if (sh, sw) != (1, 1):  # spread the output gradient out to stride 1: zeros between the rows and columns
        up = go.new_zeros(n, c, (ho - 1) * sh + 1, (wo - 1) * sw + 1)
        up[:, :, ::sh, ::sw] = go
        go = up
    # x[i] receives go[(i + p - k d) / s] * w[k]: a correlation of the spread gradient with the flipped kernel,
    # padded by d (k - 1) - p before and, after, by that plus the input rows no output reaches
    top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    bottom = top + h - (go.shape[-2] + 2 * top - dh * (kh - 1))
    right = left + w - (go.shape[-1] + 2 * left - dw * (kw - 1))
    go = F.pad(go, (left, right, top, bottom))  # negative amounts crop
    return F.conv2d(go, weight.flip(-1, -2), None, 1, 0, (dh, dw), c)


def _weight_grad(x: torch.Tensor, go: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """Gradient of the depthwise convolution with respect to its [C, 1, kh, kw] weight: for each image n
    and channel c, w[c, i, j] gathers x_pad[n, c, h s + i d, w s + j d] * go[n, c, h, w] over h, w, a
    correlation of the two planes (stride d, dilation s), here one depthwise convolution over N x C
    channels, summed over the images."""
    n, c = x.shape[:2]
    kh, kw = kernel
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    planes = xp.reshape(1, n * c, xp.shape[-2], xp.shape[-1])
    kernels = go.reshape(n * c, 1, go.shape[-2], go.shape[-1])
    out = F.conv2d(planes, kernels, None, dilation, 0, stride, n * c)  # [1, N C, >= kh, >= kw]
    return out[0, :, :kh, :kw].reshape(n, c, kh, kw).sum(0).unsqueeze(1)


def _backward(go: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
              padding: tuple[int, int], dilation: tuple[int, int], need_x: bool = True,
              need_w: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(input gradient, weight gradient) of ``conv2d(x, weight, None, stride, padding, dilation, groups=C)``
    given the output gradient ``go``, as the switched layers compute them: the weight gradient is ours;
    the input gradient is ours on dilated layers and PyTorch's on the others, where it is as fast. A
    gradient not asked for is None."""
    gx = gw = None
    if need_x:
        if max(dilation) > 1:
            gx = _input_grad(go, weight, x.shape, stride, padding, dilation)
        else:
            gx = torch.ops.aten.convolution_backward(go, x, weight, None, list(stride), list(padding), list(dilation),
                                                     False, [0, 0], x.shape[1], [True, False, False])[0]
    if need_w:
        gw = _weight_grad(x.contiguous(), go, tuple(weight.shape[-2:]), stride, padding, dilation)
    return gx, gw


class _DepthwiseConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx: Any, go: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conf
        go = go.contiguous()
        gx, gw = _backward(go, x, weight, stride, padding, dilation, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        gb = go.sum((0, 2, 3)) if has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                     dilation: int | tuple[int, int] = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])`` for a depthwise
    ``weight`` of shape [C, 1, kh, kw]; on the CPU with a gradient to compute, the backward of
    :mod:`hybrid_accel.depthwise`, elsewhere PyTorch's."""
    c = x.shape[1]
    if weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv2d needs a weight of shape [{c}, 1, kh, kw] for {c} input channels, "
                         f"got {list(weight.shape)}")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if x.device.type != "cpu" or not needs_grad:
        return F.conv2d(x, weight, bias, stride, padding, dilation, c)
    return _DepthwiseConv2dFn.apply(x, weight, bias, stride, padding, dilation)


class DepthwiseConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` with ``groups == in_channels == out_channels`` and the fast CPU backward."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)
        return depthwise_conv2d(input, weight, bias, self.stride, self.padding, self.dilation)


class DepthwiseConv2dSame(Conv2dSame):
    """timm's ``Conv2dSame`` (TensorFlow 'SAME' padding, computed from the input size), depthwise, with
    the fast CPU backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return depthwise_conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation)


def _slow_in_pytorch(kernel: tuple[int, int], dilation: tuple[int, int]) -> bool:
    """Whether PyTorch's CPU backward of a depthwise layer with this kernel size and dilation is far slower
    than its forward: kernel larger than 3x3, or dilated (benchmarks/RESULTS.md section 2.4; on 3x3
    undilated ones it is as fast as this module's)."""
    return max(dilation) > 1 or max(kernel) > 3


def use_fast_depthwise(model: nn.Module, every_layer: bool = False) -> int:
    """Switch the depthwise convolutions of ``model`` (``nn.Conv2d`` or timm ``Conv2dSame``, zero
    padding, ``groups == in_channels == out_channels > 1``) to the fast CPU backward, in place: those
    with a kernel larger than 3x3 or a dilation, or every one with ``every_layer=True``. Returns how
    many were switched."""
    swapped = 0
    for m in model.modules():
        if not (isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
                and m.padding_mode == "zeros" and not isinstance(m.padding, str)):
            continue
        if not (every_layer or _slow_in_pytorch(m.kernel_size, m.dilation)):
            continue
        if type(m) is nn.Conv2d:
            m.__class__ = DepthwiseConv2d
        elif type(m) is Conv2dSame:
            m.__class__ = DepthwiseConv2dSame
        else:
            continue
        swapped += 1
    return swapped
