"""DCR: mixing before the forward, pseudo labels after it, and the loss of DESIGN.md section 3."""

import torch

from hybrid_accel import ops
from hybrid_accel.dcr import (
    choose_paste_class,
    cutmix_mask,
    cutmix_paste,
    dcr_forward,
    dcr_loss,
    make_mix,
    pseudo_labels,
    single_loss,
    warmup_loss,
)
from hybrid_accel.losses import per_instance_ce, per_instance_kl


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(B=4, C=3, H=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_i = torch.randn(B, 3, H, H, generator=g)
    x_j = torch.randn(B, 3, H, H, generator=g)
    y_i = torch.randint(0, C, (B, H, H), generator=g)
    y_i[-1] = 0  # no foreground: nothing pasted
    y_i[0, 0] = 255
    y_j = torch.randint(0, C, (B, H, H), generator=g)
    return x_i, x_j, y_i, y_j


def test_foreground_mix_matches_fused_op():
    C = 3
    x_i, x_j, y_i, _ = _batch(C=C)
    mix = make_mix(x_i, x_j, y_i, C, "foreground", generator=torch.Generator().manual_seed(1))
    assert mix.cls[-1] == -1 and not mix.mask[-1].any()
    for b in range(3):
        assert mix.cls[b] >= 1
        assert torch.equal(mix.mask[b], y_i[b] == mix.cls[b])
    torch.testing.assert_close(mix.x_m, torch.where(mix.mask[:, None], x_i, x_j))
    preds = [torch.randn(4, C, 8, 8) for _ in range(4)]
    x_m, mask, y1, y2 = ops.foreground_paste(x_i, x_j, y_i, mix.cls, *preds)
    assert torch.equal(mask, mix.mask) and torch.equal(x_m, mix.x_m)
    p1, p2 = pseudo_labels(mix, x_i, x_j, y_i, *preds)
    assert torch.equal(p1, y1) and torch.equal(p2, y2)
    # by hand: the pasted region takes network k's label on x_i, the rest its label on x_j
    want1 = torch.where(mix.mask, preds[0].argmax(1), preds[1].argmax(1))
    assert torch.equal(p1, want1)


def test_cutmix_mix_is_a_box():
    x_i, x_j, y_i, _ = _batch()
    mix = make_mix(x_i, x_j, y_i, 3, "cutmix", generator=torch.Generator().manual_seed(2))
    for b in range(4):
        rows = mix.mask[b].any(1).nonzero().flatten()
        cols = mix.mask[b].any(0).nonzero().flatten()
        box = mix.mask[b][rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and mix.mask[b].sum() == box.numel()
    assert torch.equal(mix.mask, cutmix_mask(4, 8, 8, generator=torch.Generator().manual_seed(2)))
    assert (mix.cls == -1).all()
    preds = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    p1, _ = pseudo_labels(mix, x_i, x_j, y_i, *preds, paste="cutmix")
    assert torch.equal(p1, torch.where(mix.mask, preds[0].argmax(1), preds[1].argmax(1)))


def test_dcr_loss_formula_and_gradient_routing():
    C, B = 3, 4
    x_i, x_j, y_i, y_j = _batch(B=B, C=C)
    mix = make_mix(x_i, x_j, y_i, C, "foreground", generator=torch.Generator().manual_seed(3))
    out1 = torch.randn(3 * B, C, 8, 8, requires_grad=True)
    out2 = torch.randn(3 * B, C, 8, 8, requires_grad=True)
    w_i = torch.tensor([1.0, 0.5, 0.0, 1.0])
    w_j = torch.tensor([0.25, 1.0, 1.0, 0.75])
    lam = 4.0
    loss, parts = dcr_loss(out1, out2, y_i, y_j, w_i, w_j, mix, x_i, x_j, lam)
    o1_i, o1_j, o1_m = out1.detach().split(B)
    o2_i, o2_j, o2_m = out2.detach().split(B)
    y1m = torch.where(mix.mask, o1_i.argmax(1), o1_j.argmax(1))
    y2m = torch.where(mix.mask, o2_i.argmax(1), o2_j.argmax(1))
    r = per_instance_ce(o1_m, y2m) + per_instance_ce(o2_m, y1m)
    want = (w_i * per_instance_ce(o1_i, y_i) + w_j * per_instance_ce(o2_j, y_j) + lam * (w_i + w_j) / 2 * r).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(parts["loss/total"], want)
    loss.backward()
    # network 1's outputs on x_j and network 2's on x_i only make pseudo labels: no gradient
    assert out1.grad[B:2 * B].abs().max() == 0
    assert out2.grad[:B].abs().max() == 0
    assert out1.grad[:B].abs().max() > 0 and out1.grad[2 * B:].abs().max() > 0
    # w_i[2] = 0: no supervised gradient on x_i[2]; its mixed image still counts with (0 + 1) / 2
    assert out1.grad[2].abs().max() == 0 and out1.grad[2 * B + 2].abs().max() > 0
    loss0, _ = dcr_loss(out1, out2, y_i, y_j, w_i, w_j, mix, x_i, x_j, 0.0)
    want0 = (w_i * per_instance_ce(o1_i, y_i) + w_j * per_instance_ce(o2_j, y_j)).mean()
    torch.testing.assert_close(loss0.detach(), want0)


def test_supervised_term_of_zero_weight_instance_has_no_gradient():
    C, B = 2, 2
    x_i, x_j, y_i, y_j = _batch(B=B, C=C)
    mix = make_mix(x_i, x_j, y_i, C, "foreground")
    out1 = torch.randn(3 * B, C, 8, 8, requires_grad=True)
    out2 = torch.randn(3 * B, C, 8, 8, requires_grad=True)
    loss, _ = dcr_loss(out1, out2, y_i, y_j, torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]), mix, x_i, x_j, 4.0)
    loss.backward()
    assert out1.grad[0].abs().max() == 0 and out1.grad[2 * B].abs().max() == 0  # (w_i + w_j)/2 = 0 too


def test_kl_variant():
    C, B = 3, 4
    x_i, x_j, y_i, y_j = _batch(B=B, C=C)
    mix = make_mix(x_i, x_j, y_i, C, "foreground")
    out1, out2 = torch.randn(3 * B, C, 8, 8), torch.randn(3 * B, C, 8, 8)
    w = torch.ones(B)
    loss, parts = dcr_loss(out1, out2, y_i, y_j, w, w, mix, x_i, x_j, 1.0, pseudo_loss="kl")
    o1_i, o1_j, o1_m = out1.split(B)
    o2_i, o2_j, o2_m = out2.split(B)
    m = mix.mask[:, None]
    t2 = torch.where(m, o2_i.softmax(1), o2_j.softmax(1))
    t1 = torch.where(m, o1_i.softmax(1), o1_j.softmax(1))
    r = per_instance_kl(o1_m, t2) + per_instance_kl(o2_m, t1)
    torch.testing.assert_close(parts["loss/reg"], r.mean())
    assert torch.isfinite(loss)


def test_single_loss_and_dcr_forward_shapes():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.c(x)

    x_i, x_j, y_i, _ = _batch(B=2, C=2)
    mix = make_mix(x_i, x_j, y_i, 2, "foreground")
    a, b = dcr_forward(Net(), Net(), x_i, x_j, mix)
    assert a.shape == b.shape == (6, 2, 8, 8)
    loss, _ = single_loss(a[:2], y_i, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(loss, (per_instance_ce(a[:2], y_i) * torch.tensor([1.0, 0.5])).mean())


def test_both_supervision_trains_each_network_on_both_images():
    # method.dcr_supervision=both (the authors' code): w_i l(x_i) + w_j l(x_j) for each network,
    # averaged over the 2B images; the regularisation term is unchanged.
    C, B = 3, 4
    x_i, x_j, y_i, y_j = _batch(B=B, C=C, seed=5)
    mix = make_mix(x_i, x_j, y_i, C, "foreground", generator=torch.Generator().manual_seed(3))
    out1 = torch.randn(3 * B, C, 8, 8, requires_grad=True)
    out2 = torch.randn(3 * B, C, 8, 8, requires_grad=True)
    w_i = torch.tensor([1.0, 0.5, 0.0, 1.0])
    w_j = torch.tensor([0.25, 1.0, 1.0, 0.75])
    loss, parts = dcr_loss(out1, out2, y_i, y_j, w_i, w_j, mix, x_i, x_j, 2.0, supervision="both")
    o1_i, o1_j, _ = out1.detach().split(B)
    o2_i, o2_j, _ = out2.detach().split(B)
    sup1 = (w_i * per_instance_ce(o1_i, y_i)).sum() / (2 * B) + (w_j * per_instance_ce(o1_j, y_j)).sum() / (2 * B)
    sup2 = (w_i * per_instance_ce(o2_i, y_i)).sum() / (2 * B) + (w_j * per_instance_ce(o2_j, y_j)).sum() / (2 * B)
    _, split_parts = dcr_loss(out1, out2, y_i, y_j, w_i, w_j, mix, x_i, x_j, 2.0)
    torch.testing.assert_close(parts["loss/sup1"], sup1)
    torch.testing.assert_close(parts["loss/sup2"], sup2)
    torch.testing.assert_close(parts["loss/reg"], split_parts["loss/reg"])
    torch.testing.assert_close(loss.detach(), sup1 + sup2 + 2.0 * split_parts["loss/reg"])
    loss.backward()
    # unlike split supervision, network 1's outputs on x_j and network 2's on x_i get gradient
    assert out1.grad[B:2 * B].abs().max() > 0 and out2.grad[:B].abs().max() > 0


def test_warmup_loss_is_the_supervised_part_without_a_mix():
    torch.manual_seed(0)
    C, B = 3, 4
    x_i, x_j, y_i, y_j = _batch(B=B, C=C, seed=6)
    net1 = torch.nn.Conv2d(3, C, 1)
    net2 = torch.nn.Conv2d(3, C, 1)
    w_i, w_j = torch.ones(B), torch.tensor([1.0, 0.0, 0.5, 1.0])
    for supervision in ("split", "both"):
        loss, parts = warmup_loss(net1, net2, x_i, x_j, y_i, y_j, w_i, w_j, supervision)
        with torch.no_grad():
            o1 = net1(torch.cat([x_i, x_j, x_i]))
            o2 = net2(torch.cat([x_i, x_j, x_i]))
        mix = make_mix(x_i, x_j, y_i, C, "foreground")
        _, full = dcr_loss(o1, o2, y_i, y_j, w_i, w_j, mix, x_i, x_j, 0.0, supervision=supervision)
        torch.testing.assert_close(parts["loss/sup1"], full["loss/sup1"])
        torch.testing.assert_close(parts["loss/sup2"], full["loss/sup2"])
        torch.testing.assert_close(loss.detach(), full["loss/total"])
        assert "loss/reg" not in parts


def test_choose_paste_class_uniform_and_empty():
    y = torch.zeros(4, 8, 8, dtype=torch.long)
    y[0, :2] = 1
    y[0, 5:] = 3
    y[1] = 255  # ignore only: nothing to paste
    y[2, 0, 0] = 2
    y[3, 1:3] = 255
    g = _gen(0)
    picks = torch.stack([choose_paste_class(y, 4, generator=g) for _ in range(4000)])
    assert set(picks[:, 0].unique().tolist()) == {1, 3}
    frac3 = (picks[:, 0] == 3).float().mean().item()
    assert 0.45 < frac3 < 0.55, frac3
    assert (picks[:, 1] == -1).all() and (picks[:, 3] == -1).all()
    assert (picks[:, 2] == 2).all()
    # deterministic from the generator
    assert torch.equal(choose_paste_class(y, 4, generator=_gen(7)), choose_paste_class(y, 4, generator=_gen(7)))


def test_cutmix_paste_box():
    g = _gen(1)
    x_i, x_j = torch.randn(6, 3, 40, 50, generator=g), torch.randn(6, 3, 40, 50, generator=g)
    preds = [torch.randn(6, 2, 40, 50, generator=g) for _ in range(4)]
    x_m, mask, y1, y2 = cutmix_paste(x_i, x_j, *preds, area=(0.25, 0.5), generator=_gen(0))
    frac = mask.flatten(1).float().mean(1)
    assert ((frac > 0.2) & (frac < 0.55)).all(), frac
    for k in range(6):
        rows = mask[k].any(1).nonzero().flatten()
        cols = mask[k].any(0).nonzero().flatten()
        box = mask[k, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all(), "CutMix mask must be one rectangle"
    assert torch.equal(x_m, torch.where(mask.unsqueeze(1), x_i, x_j))
    # the mask alone is the same draw, and the pseudo labels follow it
    assert torch.equal(mask, cutmix_mask(6, 40, 50, (0.25, 0.5), _gen(0)))
    assert torch.equal(y1, torch.where(mask, preds[0].argmax(1), preds[1].argmax(1)))
    assert torch.equal(y2, torch.where(mask, preds[2].argmax(1), preds[3].argmax(1)))


def test_peer_fill_teaches_each_network_the_others_answer_in_the_band():
    # method.band_fill=peer: in the band of a weak mask network 1's target is network 2's prediction
    # and the reverse; outside it the label; the regularisation term is unchanged
    from hybrid_accel.dcr import peer_fill

    C, B = 3, 4
    x_i, x_j, y_i, y_j = _batch(B=B, C=C, seed=7)
    mix = make_mix(x_i, x_j, y_i, C, "foreground", generator=torch.Generator().manual_seed(1))
    out1 = torch.randn(3 * B, C, 8, 8)
    out2 = torch.randn(3 * B, C, 8, 8)
    w_i, w_j = torch.tensor([1.0, 0.5, 0.0, 1.0]), torch.tensor([0.25, 1.0, 1.0, 0.75])
    g = torch.Generator().manual_seed(2)
    band_i, band_j = torch.rand(B, 8, 8, generator=g) < 0.3, torch.rand(B, 8, 8, generator=g) < 0.3
    band_i[0] = False  # an image without a band (a strong one) keeps its label
    o1_i, o1_j, _ = out1.split(B)
    o2_i, o2_j, _ = out2.split(B)
    t = peer_fill(y_i, band_i, o2_i)
    assert torch.equal(t[band_i], o2_i.argmax(1)[band_i]) and torch.equal(t[~band_i], y_i[~band_i])
    assert peer_fill(y_i, None, o2_i) is y_i and peer_fill(y_i, torch.zeros_like(band_i), o2_i) is y_i
    for sup in ("split", "both"):
        loss, parts = dcr_loss(out1, out2, y_i, y_j, w_i, w_j, mix, x_i, x_j, 2.0, supervision=sup,
                               band_i=band_i, band_j=band_j, band_fill="peer")
        plain, plain_parts = dcr_loss(out1, out2, y_i, y_j, w_i, w_j, mix, x_i, x_j, 2.0, supervision=sup)
        y1i, y1j = peer_fill(y_i, band_i, o2_i), peer_fill(y_j, band_j, o2_j)
        y2i, y2j = peer_fill(y_i, band_i, o1_i), peer_fill(y_j, band_j, o1_j)
        if sup == "split":
            sup1 = (w_i * per_instance_ce(o1_i, y1i)).mean()
            sup2 = (w_j * per_instance_ce(o2_j, y2j)).mean()
        else:
            sup1 = ((w_i * per_instance_ce(o1_i, y1i)).sum() + (w_j * per_instance_ce(o1_j, y1j)).sum()) / (2 * B)
            sup2 = ((w_i * per_instance_ce(o2_i, y2i)).sum() + (w_j * per_instance_ce(o2_j, y2j)).sum()) / (2 * B)
        torch.testing.assert_close(parts["loss/sup1"], sup1)
        torch.testing.assert_close(parts["loss/sup2"], sup2)
        assert not torch.allclose(parts["loss/sup1"], plain_parts["loss/sup1"])
        torch.testing.assert_close(parts["loss/reg"], plain_parts["loss/reg"])
        # band_fill=ignore: the band is left out of both networks' targets
        _, ign = dcr_loss(out1, out2, y_i, y_j, w_i, w_j, mix, x_i, x_j, 2.0, supervision=sup, band_i=band_i,
                          band_j=band_j, band_fill="ignore")
        yi0, yj0 = y_i.masked_fill(band_i, 255), y_j.masked_fill(band_j, 255)
        _, want = dcr_loss(out1, out2, yi0, yj0, w_i, w_j, mix, x_i, x_j, 2.0, supervision=sup)
        torch.testing.assert_close(ign["loss/sup1"], want["loss/sup1"])
        torch.testing.assert_close(ign["loss/sup2"], want["loss/sup2"])
        torch.testing.assert_close(ign["loss/reg"], plain_parts["loss/reg"])  # pseudo labels from whole labels
        # no band anywhere: the plain loss
        same, _ = dcr_loss(out1, out2, y_i, y_j, w_i, w_j, mix, x_i, x_j, 2.0, supervision=sup,
                           band_i=torch.zeros_like(band_i), band_j=torch.zeros_like(band_j), band_fill="peer")
        torch.testing.assert_close(same, plain)
