"""Depthwise convolutions whose CPU backward pass is computed as forward convolutions.

On the CPU, PyTorch's backward of a depthwise convolution (``groups == in_channels == out_channels``)
is far slower than its forward, and slowest for the dilated ones that an output stride of 16 puts in
the last encoder stages: on one thread, for a [24, 1152, 6, 8] input with a 5x5 kernel at dilation 2,
the forward takes 2 ms and the input gradient 73 ms (benchmarks/RESULTS.md section 5). The input
gradient of a depthwise convolution is itself a depthwise convolution (of the output gradient, with
the kernel flipped; for a strided one, of the output gradient spread out with zeros), so it is
computed here as one, at the cost of a forward pass. The weight gradient keeps PyTorch's kernel
(the alternatives measured, a grouped convolution over the batch and unfold, were slower).

:func:`use_fast_depthwise` switches a model's depthwise ``nn.Conv2d`` (and timm ``Conv2dSame``)
modules to this backward. Parameters, state-dict keys and outputs stay as they are; on a GPU, or
when no gradient is needed, the modules run PyTorch's own convolution.
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
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _input_grad(go, weight, x.shape, stride, padding, dilation)
        if ctx.needs_input_grad[1]:
            gw = torch.ops.aten.convolution_backward(go, x, weight, None, list(stride), list(padding), list(dilation),
                                                     False, [0, 0], x.shape[1], [False, True, False])[1]
        if has_bias and ctx.needs_input_grad[2]:
            gb = go.sum((0, 2, 3))
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


def use_fast_depthwise(model: nn.Module) -> int:
    """Switch every depthwise convolution of ``model`` (``nn.Conv2d`` or timm ``Conv2dSame``, zero
    padding, ``groups == in_channels == out_channels > 1``) to the fast CPU backward, in place.
    Returns how many were switched."""
    swapped = 0
    for m in model.modules():
        if not (isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
                and m.padding_mode == "zeros" and not isinstance(m.padding, str)):
            continue
        if type(m) is nn.Conv2d:
            m.__class__ = DepthwiseConv2d
        elif type(m) is Conv2dSame:
            m.__class__ = DepthwiseConv2dSame
        else:
            continue
        swapped += 1
    return swapped
