"""Pure-PyTorch twins of the compiled ops.

They share the compiled ops' signatures and semantics, serve as the fallback when the extension is
not built, and are the oracle the kernel tests compare against.
"""

from __future__ import annotations

import torch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 inputs keep float64 accumulation (used by the exactness tests); everything else
    # accumulates in float32, whatever the storage dtype.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise when tensors sit on different devices: mixed meta/CPU inputs would otherwise compute on
    uninitialised memory and return values instead of an error."""
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        where = ", ".join(f"`{n}` on {d}" for n, d in devs.items())
        raise ValueError(f"{op}: inputs on different devices ({where}); move them to one device")


def grad_dot_ref(
    feats: torch.Tensor,
    grad_logits: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """s[k, r] = sum_p grad_logits[k, :, p] . (ref_weight[r] @ feats[k, :, p] + ref_bias[r]).

    Canonical shapes: feats [B, F, P], grad_logits [B, C, P], ref_weight [R, C, F],
    ref_bias [R, C] or None. Returns [B, R] in the accumulation dtype.
    """
    _same_device("grad_dot", feats=feats, grad_logits=grad_logits, ref_weight=ref_weight, ref_bias=ref_bias)
    acc = _acc_dtype(feats.dtype)
    f = feats.to(acc)
    g = grad_logits.to(acc)
    # The per-instance final-layer gradient G_k = g_k f_k^T is only C x F, so one batched matmul
    # gives all of them; this is the fastest formulation that plain PyTorch offers.
    G = torch.bmm(g, f.transpose(1, 2))  # [B, C, F]
    s = torch.einsum("bcf,rcf->br", G, ref_weight.to(acc))
    if ref_bias is not None:
        s = s + g.sum(dim=2) @ ref_bias.to(acc).transpose(0, 1)
    return s


def paste_mask_ref(y_i: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Boolean paste mask B = (y_i == cls) per sample; cls < 0 means an empty mask."""
    c = cls.view(-1, 1, 1)
    return (y_i == c) & (c >= 0)


def mix_with_mask_ref(
    x_i: torch.Tensor,
    x_j: torch.Tensor,
    mask: torch.Tensor,
    p1_i: torch.Tensor,
    p1_j: torch.Tensor,
    p2_i: torch.Tensor,
    p2_j: torch.Tensor,
):
    """x_m = B x_i + (1 - B) x_j and hard pseudo labels argmax(B p(x_i) + (1 - B) p(x_j))."""
    m = mask.unsqueeze(1)
    x_m = torch.where(m, x_i, x_j)
    # B is 0/1 per pixel, so the mixed prediction is a per-pixel selection and its argmax is the
    # argmax of the selected source (softmax is monotone: logits or probabilities give the same).
    y1 = torch.where(m, p1_i, p1_j).argmax(dim=1)
    y2 = torch.where(m, p2_i, p2_j).argmax(dim=1)
    return x_m, mask, y1, y2


def foreground_paste_ref(x_i, x_j, y_i, cls, p1_i, p1_j, p2_i, p2_j):
    """Twin of the fused op: (x_m, mask, y1_m, y2_m)."""
    _same_device("foreground_paste", x_i=x_i, x_j=x_j, y_i=y_i, cls=cls, p1_i=p1_i, p1_j=p1_j, p2_i=p2_i, p2_j=p2_j)
    mask = paste_mask_ref(y_i, cls)
    return mix_with_mask_ref(x_i, x_j, mask, p1_i, p1_j, p2_i, p2_j)
