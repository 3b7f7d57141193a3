"""DII: hypergradient sign and scale on cases small enough to check by hand, and gamma's Adam."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_accel import ops
from hybrid_accel.dii import (
    DIIUpdater,
    ScanCache,
    calibrate_logits,
    GammaState,
    centred_reference,
    classifier_grad,
    dii_scores,
    due,
    foreground_area,
    read_gamma_csv,
    reference_grad,
    weak_scores,
    write_gamma_csv,
)
from hybrid_accel.losses import per_instance_ce
from hybrid_accel.model import SegOutput
from hybrid_accel.sampling import StepSampler, hybrid_weights


class FeatNet(nn.Module):
    """``feats = x``: the classifier sees the 'image' directly, so gradients are explicit."""

    def __init__(self, F_, C):
        super().__init__()
        self.classifier = nn.Conv2d(F_, C, 1)

    def forward(self, x, return_features=False):
        z = self.classifier(x)
        return SegOutput(z, z, x) if return_features else z


def _acc():
    return SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))


def _items(x, y):
    return [{"image": x[k], "mask": y[k]} for k in range(len(x))]


def _per_sample_grads(net, x, y):
    """Explicit per-instance gradient of l_k (mean CE over valid pixels) wrt the classifier, float64."""
    out = []
    for k in range(len(x)):
        net.zero_grad()
        z = net(x[k : k + 1].double())
        valid = y[k] != 255
        loss = F.cross_entropy(z, y[k : k + 1], ignore_index=255, reduction="sum") / valid.sum().clamp(min=1)
        loss.backward()
        out.append(torch.cat([net.classifier.weight.grad.flatten(), net.classifier.bias.grad]).clone())
    return torch.stack(out)


def test_hypergradient_by_hand_one_pixel():
    # One pixel, one feature, two classes, zero-initialised classifier: p = (0.5, 0.5), so
    # dl/dz = p - onehot = (-0.5, +0.5) for label 0 and (+0.5, -0.5) for label 1, and
    # dl/dW = (dl/dz) h. Strong image: h = 2, label 1 -> g_S = (W: (+1, -1), b: (+0.5, -0.5)).
    # Weak image A (h = 4, label 1, agrees):  g_A = (W: (+2, -2), b: (+.5, -.5)) -> s_A = 2+2+.25+.25 = 4.5
    # Weak image B (h = 4, label 0, inverted): s_B = -4.5.
    net = FeatNet(1, 2)
    nn.init.zeros_(net.classifier.weight)
    nn.init.zeros_(net.classifier.bias)
    xs = torch.tensor([2.0]).view(1, 1, 1, 1)
    ys = torch.tensor([1]).view(1, 1, 1)
    gW, gb = reference_grad(net, _items(xs, ys), [0], _acc(), batch_size=4)
    torch.testing.assert_close(gW, torch.tensor([[1.0], [-1.0]]))
    torch.testing.assert_close(gb, torch.tensor([0.5, -0.5]))
    xw = torch.tensor([4.0, 4.0]).view(2, 1, 1, 1)
    yw = torch.tensor([1, 0]).view(2, 1, 1)
    s = weak_scores(net, _items(xw, yw), [0, 1], (gW, gb), _acc(), batch_size=4)
    torch.testing.assert_close(s, torch.tensor([4.5, -4.5]))
    # hypergradient = -s; Adam's first step moves by exactly lr against its sign
    g = GammaState(2, init=0.5, lr=0.1)
    g.step(torch.tensor([0, 1]), -s)
    torch.testing.assert_close(g.gamma, torch.tensor([0.6, 0.4]))


def test_scores_match_explicit_per_sample_gradients():
    torch.manual_seed(0)
    B, F_, C, H = 6, 5, 3, 4
    net = FeatNet(F_, C).double()
    x = torch.randn(B, F_, H, H, dtype=torch.float64)
    y = torch.randint(0, C, (B, H, H))
    y[0, :2] = 255  # ignore pixels never count
    strong, weak = [0, 1, 2], [3, 4, 5]
    G = _per_sample_grads(net, x, y)
    g_ref = G[strong].mean(0)
    gW, gb = reference_grad(net, _items(x, y), strong, _acc(), batch_size=2)
    torch.testing.assert_close(torch.cat([gW.flatten(), gb]).double(), g_ref, rtol=1e-5, atol=1e-6)
    s = weak_scores(net, _items(x, y), weak, (gW.double(), gb.double()), _acc(), batch_size=2)
    torch.testing.assert_close(s.double(), G[weak] @ g_ref, rtol=1e-4, atol=1e-6)


def test_centred_scores_match_explicit_centred_gradients():
    # dii.score=centred: s_k = <G_k - g_b,k c^T, G_S - g_b,S c^T> (no bias term), c = the strong
    # images' mean feature; computed by the same fused op through centred_reference.
    torch.manual_seed(2)
    B, F_, C, H = 7, 4, 3, 5
    net = FeatNet(F_, C).double()
    x = torch.randn(B, F_, H, H, dtype=torch.float64) + 1.5
    y = torch.randint(0, C, (B, H, H))
    y[4, 1:] = 255
    strong, weak = [0, 1, 2], [3, 4, 5, 6]
    G = _per_sample_grads(net, x, y)
    Wg, bg = G[:, : C * F_].view(B, C, F_), G[:, C * F_:]
    c = x[strong].mean((0, 2, 3))
    Gc = Wg - bg.unsqueeze(2) * c.view(1, 1, F_)
    want = (Gc[weak] * Gc[strong].mean(0)).sum((1, 2))
    gW, gb, hbar = reference_grad(net, _items(x, y), strong, _acc(), batch_size=2, feature_mean=True)
    torch.testing.assert_close(hbar.double(), c, rtol=1e-6, atol=1e-6)
    ref = centred_reference(gW.double(), gb.double(), hbar.double())
    s = weak_scores(net, _items(x, y), weak, ref, _acc(), batch_size=3)
    torch.testing.assert_close(s.double(), want, rtol=1e-4, atol=1e-6)


def _polyp_feature_net(p_polyp, p_background):
    """Two features, two classes: feature 0 marks polyp pixels, feature 1 is constant; p(fg) is
    ``p_polyp`` where feature 0 is on and ``p_background`` elsewhere."""
    net = FeatNet(2, 2)
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    with torch.no_grad():
        net.classifier.weight.zero_()
        net.classifier.bias.zero_()
        net.classifier.weight[1, 0] = logit(p_polyp) - logit(p_background)
        net.classifier.weight[1, 1] = logit(p_background)
    return net


def _overpredicting_case():
    """A network that over-predicts foreground everywhere but ranks polyp pixels higher: feature 0
    marks the polyp (the left 2 of 8 columns), feature 1 is constant. p(fg) = 0.6 on background, 0.8
    on the polyp. Image 0 (strong) and 1 (weak, same polyp) are labelled exactly; image 2 is the
    same image with its foreground dropped (all background)."""
    net = _polyp_feature_net(p_polyp=0.8, p_background=0.6)
    h = torch.zeros(3, 2, 4, 8)
    h[:, 0, :, :2] = 1.0
    h[:, 1] = 1.0
    y = torch.zeros(3, 4, 8, dtype=torch.long)
    y[:2, :, :2] = 1
    return net, _items(h, y)


@pytest.mark.parametrize("score, dropped_sign", [("paper", 1.0), ("centred", -1.0)])
def test_dropped_annotation_on_an_overpredicting_network(score, dropped_sign):
    # The paper's score rewards an all-background mask whenever the network over-predicts
    # foreground (both gradients mostly say "less foreground everywhere"); the centred score
    # compares what is left, "more foreground on polyp-like features", and penalises it.
    net, items = _overpredicting_case()
    cfg = SimpleNamespace(strong_batches=0, scan="all", scan_size=0, scan_batch_size=4, score=score)
    up = DIIUpdater(GammaState(2), items, np.array([0]), np.array([1, 2]), cfg, seed=0)
    stats = up.update(net, _acc(), step=1)
    assert stats["dii/strong_fg_excess"] == pytest.approx((0.6 * 24 + 0.8 * 8) / 32 - 8 / 32, abs=1e-5)
    assert up.gamma.gamma[0] > 0.5  # the exact annotation agrees under both scores
    assert (up.gamma.gamma[1] - 0.5) * dropped_sign > 0


def test_gamma_adam_equals_torch_adam_and_clips():
    torch.manual_seed(1)
    n = 7
    g = GammaState(n, init=0.5, lr=0.1, betas=(0.9, 0.999), clip=(0.0, 1.0))
    p = torch.full((n,), 0.5, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1, betas=(0.9, 0.999))
    for _ in range(12):
        hg = torch.randn(n) * 3
        g.step(torch.arange(n), hg)
        opt.zero_grad()
        p.grad = hg.clone()
        opt.step()
        with torch.no_grad():
            p.clamp_(0, 1)
        torch.testing.assert_close(g.gamma, p.detach(), rtol=1e-5, atol=1e-6)
    # consistent sign -> saturates at the clip bounds
    g2 = GammaState(2, init=0.5, lr=0.1)
    for _ in range(10):
        g2.step(torch.tensor([0, 1]), torch.tensor([-1.0, 1.0]))
    assert g2.gamma.tolist() == [1.0, 0.0]


def test_subset_update_leaves_unscanned_entries():
    g = GammaState(5, init=0.5, lr=0.1)
    g.step(torch.tensor([1, 3]), torch.tensor([-2.0, 2.0]))
    g.step(torch.tensor([0]), torch.tensor([1.0]))
    torch.testing.assert_close(g.gamma, torch.tensor([0.4, 0.6, 0.5, 0.4, 0.5]))
    assert g.steps.tolist() == [1, 1, 0, 1, 0]
    sd = g.state_dict()
    h = GammaState(5)
    h.load_state_dict(sd)
    assert torch.equal(h.gamma, g.gamma) and h.checksum() == g.checksum()
    with pytest.raises(ValueError, match="weak images"):
        GammaState(4).load_state_dict(sd)


def test_weights_and_due():
    g = GammaState(3, init=0.25)
    w = g.weights(torch.tensor([-1, 2, 0, -1]))
    assert w.tolist() == [1.0, 0.25, 0.25, 1.0]
    assert [t for t in range(1, 13) if due(t, 4, 0)] == [4, 8, 12]
    assert [t for t in range(1, 13) if due(t, 4, 8)] == [8, 12]


def test_updater_scan_subset_and_strong_batches():
    cfg = SimpleNamespace(strong_batches=2, scan="subset", scan_size=3)
    up = DIIUpdater(GammaState(10), None, np.array([0, 1, 2]), np.arange(3, 13), cfg, seed=0, batch_size=2)
    s1, s2 = up.scan_set(5), up.scan_set(5)
    assert len(s1) == 3 and np.array_equal(s1, s2) and not np.array_equal(s1, up.scan_set(6))
    strong = up.strong_set(5, world=2)
    assert len(strong) == 8 and set(strong) <= {0, 1, 2}
    cfg.strong_batches = 0
    assert up.strong_set(5, world=2) == [0, 1, 2]


def test_update_reports_the_strong_sets_foreground_excess():
    # dii/strong_fg_excess = mean over strong images of (predicted - true) foreground fraction,
    # from g_S's bias part; its sign tells whether all-background weak masks will score positive.
    torch.manual_seed(3)
    net = FeatNet(4, 3)
    x = torch.randn(5, 4, 6, 6)
    y = torch.randint(0, 3, (5, 6, 6))
    y[1, :, :3] = 255  # ignored pixels count in neither fraction
    strong, weak = np.array([0, 1, 2]), np.array([3, 4])
    cfg = SimpleNamespace(strong_batches=0, scan="all", scan_size=0, scan_batch_size=2, score="paper")
    up = DIIUpdater(GammaState(2), _items(x, y), strong, weak, cfg, seed=0)
    stats = up.update(net, _acc(), step=10)
    with torch.no_grad():
        p = net(x).softmax(1)
    want = []
    for k in strong:
        valid = y[k] != 255
        pred = p[k, 1:][:, valid].sum(0).mean()
        true = ((y[k][valid] >= 1).float()).mean()
        want.append(float(pred - true))
    assert stats["dii/strong_fg_excess"] == pytest.approx(np.mean(want), abs=1e-5)
    # an over-predicting network: every all-background weak mask then scores positive
    nn.init.zeros_(net.classifier.weight)
    with torch.no_grad():
        net.classifier.bias.copy_(torch.tensor([-2.0, 1.0, 1.0]))
    y_bg = y.clone()
    y_bg[3:] = 0
    up = DIIUpdater(GammaState(2), _items(x, y_bg), strong, weak, cfg, seed=0)
    stats = up.update(net, _acc(), step=10)
    assert stats["dii/strong_fg_excess"] > 0.2
    assert stats["dii/score_pos_frac"] == 1.0 and torch.all(up.gamma.gamma > 0.5)


def test_sampler_is_stateless_and_weighted():
    w = hybrid_weights(np.array([0, 1, 1, 1]), np.array([-1, 0, 1, 2]), torch.tensor([0.0, 1.0, 0.0]))
    assert w.tolist() == [1.0, 0.0, 1.0, 0.0]
    s = StepSampler(4, 64, seed=3, stream="primary", rank=0, weights=w)
    assert set(s.indices(10).tolist()) <= {0, 2}
    assert np.array_equal(s.indices(10), s.indices(10))
    assert not np.array_equal(s.indices(10), s.indices(11))
    other = StepSampler(4, 64, seed=3, stream="primary", rank=1, weights=w)
    assert not np.array_equal(s.indices(10), other.indices(10))
    assert s.batch(10)[0][1] != other.batch(10)[0][1]  # augmentation seeds differ per rank too


def test_sampling_floor_keeps_low_gamma_weak_images_in_the_draw():
    kinds, rank = np.array([0, 1, 1, 1]), np.array([-1, 0, 1, 2])
    g = torch.tensor([0.0, 0.9, 0.1])
    assert hybrid_weights(kinds, rank, g, floor=0.3).tolist() == pytest.approx([1.0, 0.3, 0.9, 0.3])
    assert hybrid_weights(kinds, rank, g).tolist() == pytest.approx([1.0, 0.0, 0.9, 0.1])  # paper: no floor
    s = StepSampler(4, 4000, seed=0, stream="primary", weights=hybrid_weights(kinds, rank, g, floor=0.3))
    share = np.bincount(s.indices(0), minlength=4) / 4000
    assert share[1] == pytest.approx(0.3 / 2.5, abs=0.03) and share[2] == pytest.approx(0.9 / 2.5, abs=0.03)


def test_weight_score_drops_the_bias_term():
    # dii.score=weight (the authors' code): s_k = <G_k, G_S>, the classifier weight's gradients only
    torch.manual_seed(3)
    B, F_, C, H = 6, 4, 3, 4
    net = FeatNet(F_, C).double()
    x = torch.randn(B, F_, H, H, dtype=torch.float64)
    y = torch.randint(0, C, (B, H, H))
    strong, weak = [0, 1], [2, 3, 4, 5]
    G = _per_sample_grads(net, x, y)[:, : C * F_]
    want = G[weak] @ G[strong].mean(0)
    cfg = SimpleNamespace(strong_batches=0, scan="all", scan_size=0, scan_batch_size=3, score="weight")
    up = DIIUpdater(GammaState(4), _items(x, y), np.array(strong), np.array(weak), cfg, seed=0)
    up.update(net, _acc(), step=1)
    moved = torch.sign(up.gamma.gamma - 0.5)
    assert torch.equal(moved, torch.sign(want).float())  # Adam's first step: lr times the score's sign
    gW, gb = reference_grad(net, _items(x, y), strong, _acc(), batch_size=2)
    s = weak_scores(net, _items(x, y), weak, (gW, torch.zeros_like(gb)), _acc(), batch_size=2)
    torch.testing.assert_close(s.double(), want, rtol=1e-4, atol=1e-6)


def test_gamma_lr_scale():
    # dii.lr_schedule=poly passes the network's schedule factor: Adam's first step moves by lr * scale
    g = GammaState(2, init=0.5, lr=0.1)
    g.step(torch.tensor([0, 1]), torch.tensor([-1.0, 2.0]), lr_scale=0.25)
    torch.testing.assert_close(g.gamma, torch.tensor([0.525, 0.475]))


def test_gamma_inv_sqrt_schedule():
    # dii.lr_schedule=inv_sqrt: the k-th update's rate is lr / sqrt(k), counted by GammaState.updates
    # (saved in checkpoints, so a resumed run goes on with the same step sizes). With a score of one
    # sign, each Adam step moves gamma by exactly its rate.
    from hybrid_accel.config import load_config
    from hybrid_accel.train import gamma_lr_scale

    cfg = load_config(None, ["dii.lr_schedule=inv_sqrt"])
    g = GammaState(2, init=0.5, lr=0.1, clip=(0.0, 2.0))
    want = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for k in range(1, 5):
        scale = gamma_lr_scale(cfg, step=100 * k, updates_done=g.updates)
        assert scale == pytest.approx(k ** -0.5)
        g.step(torch.tensor([0, 1]), torch.tensor([-3.0, 0.5]), lr_scale=scale)
        want += torch.tensor([0.1, -0.1], dtype=torch.float64) / k ** 0.5
    torch.testing.assert_close(g.gamma.double(), want, rtol=0, atol=1e-6)
    restored = GammaState(2)
    restored.load_state_dict(g.state_dict())
    assert gamma_lr_scale(cfg, 500, restored.updates) == pytest.approx(5 ** -0.5)
    for other, factor in (("constant", 1.0), ("poly", None)):
        c = load_config(None, [f"dii.lr_schedule={other}", "train.steps=100"])
        got = gamma_lr_scale(c, step=50, updates_done=3)
        assert got == pytest.approx(factor if factor is not None else 0.5 ** 0.9)


def test_scores_of_both_networks_add_up():
    # dii.networks=both: s_k is the sum of each network's score against its own g_S
    torch.manual_seed(4)
    B, F_, C, H = 6, 4, 2, 4
    nets = [FeatNet(F_, C).double(), FeatNet(F_, C).double()]
    x = torch.randn(B, F_, H, H, dtype=torch.float64)
    y = torch.randint(0, C, (B, H, H))
    strong, weak = [0, 1], [2, 3, 4, 5]
    want = []
    for net in nets:
        G = _per_sample_grads(net, x, y)
        want.append(G[weak] @ G[strong].mean(0))
    cfg = SimpleNamespace(strong_batches=0, scan="all", scan_size=0, scan_batch_size=4, score="paper")
    up = DIIUpdater(GammaState(4), _items(x, y), np.array(strong), np.array(weak), cfg, seed=0)
    stats = up.update(nets, _acc(), step=1)
    torch.testing.assert_close(up.last_scores.double(), want[0] + want[1], rtol=1e-4, atol=1e-7)
    assert stats["dii/seconds_scan"] > 0
    one = DIIUpdater(GammaState(4), _items(x, y), np.array(strong), np.array(weak), cfg, seed=0)
    one.update(nets[1], _acc(), step=1)  # a single network as before
    torch.testing.assert_close(one.last_scores.double(), want[1], rtol=1e-4, atol=1e-7)


def test_both_networks_need_dcr():
    from hybrid_accel.config import ConfigError, load_config, validate_config

    validate_config(load_config(None, ["dii.networks=both"]))
    with pytest.raises(ConfigError, match="dii.networks=both"):
        validate_config(load_config(None, ["dii.networks=both", "method.dcr=false"]))
    # a baseline without DII that inherits the setting is fine
    validate_config(load_config(None, ["dii.networks=both", "method.dcr=false", "method.dii=false",
                                       "method.dii_sampling=false"]))


def test_gamma_csv_round_trip(tmp_path):
    g = GammaState(3)
    g.gamma = torch.tensor([0.25, 1.0, 0.125])
    ds = SimpleNamespace(weak_indices=np.array([4, 1, 7]), image_paths={1: "b.png", 4: "a.png", 7: "c.png"},
                         quality={1: 0.5, 4: float("nan"), 7: 0.0})
    write_gamma_csv(tmp_path / "gamma.csv", g, ds)
    assert not (tmp_path / "gamma.csv.tmp").exists()
    gamma, quality = read_gamma_csv(tmp_path / "gamma.csv")
    assert gamma.dtype == quality.dtype == np.float64
    np.testing.assert_array_equal(gamma, [0.25, 1.0, 0.125])
    np.testing.assert_array_equal(quality, [np.nan, 0.5, 0.0])
    # rows are placed by weak_index, whatever their order in the file
    lines = (tmp_path / "gamma.csv").read_text().splitlines()
    (tmp_path / "shuffled.csv").write_text("\n".join([lines[0], lines[3], lines[1], lines[2]]) + "\n")
    gamma2, quality2 = read_gamma_csv(tmp_path / "shuffled.csv")
    np.testing.assert_array_equal(gamma2, gamma)
    np.testing.assert_array_equal(quality2, quality)


# ----------------------------------- dii_scores / classifier_grad against explicit per-sample gradients
needs_ext = pytest.mark.skipif(not ops.extension_available(), reason="compiled extension hybrid_accel._C not built")


def _per_sample_truth(feats, labels, head: nn.Conv2d, ref_w, ref_b, ignore_index=255):
    """<grad_theta' l_k, (ref_w, ref_b)> by one autograd call per instance."""
    out = []
    for k in range(feats.shape[0]):
        head.zero_grad()
        z = head(feats[k : k + 1])
        up = F.interpolate(z, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = per_instance_ce(up, labels[k : k + 1], ignore_index).sum()
        gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
        out.append((gw.squeeze(-1).squeeze(-1) * ref_w).sum() + (gb * ref_b).sum())
    return torch.stack(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("backend", ["torch", pytest.param("ext", marks=needs_ext)])
def test_dii_scores_match_per_sample_gradients(dtype, tol, backend):
    torch.manual_seed(0)
    B, Fc, C, h, w, H, W = 5, 12, 3, 7, 9, 27, 35
    head = nn.Conv2d(Fc, C, 1).to(dtype)
    feats = torch.randn(B, Fc, h, w, dtype=dtype)
    labels = torch.randint(0, C, (B, H, W))
    labels[torch.rand(B, H, W) < 0.3] = 255  # ignored pixels
    labels[2] = 255  # an instance without a single labelled pixel: zero gradient
    ref_w = torch.randn(C, Fc, dtype=dtype)
    ref_b = torch.randn(C, dtype=dtype)
    truth = _per_sample_truth(feats.double(), labels, head.double(), ref_w.double(), ref_b.double())
    head = head.to(dtype)
    with torch.no_grad():
        logits_low = head(feats)
        s = dii_scores(feats, logits_low, labels, ref_w, ref_b, backend=backend)
    assert s.shape == (B,)
    assert s[2].item() == 0.0
    rel = (s.double() - truth).abs().max() / truth.abs().max()
    assert rel < tol, rel.item()


def test_classifier_grad_matches_autograd():
    torch.manual_seed(1)
    B, Fc, C = 4, 10, 2
    head = nn.Conv2d(Fc, C, 1).double()
    feats = torch.randn(B, Fc, 6, 6, dtype=torch.float64)
    labels = torch.randint(0, C, (B, 24, 24))
    labels[:, :5] = 255
    z = head(feats)
    up = F.interpolate(z, size=(24, 24), mode="bilinear", align_corners=False)
    loss = per_instance_ce(up, labels).mean()
    gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
    with torch.no_grad():
        cw, cb = classifier_grad(feats, head(feats), labels)
    torch.testing.assert_close(cw, gw.view(C, Fc), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cb, gb, rtol=1e-12, atol=1e-14)


def _calib_case():
    torch.manual_seed(5)
    net = FeatNet(4, 3).double()
    x = torch.randn(9, 4, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (9, 6, 6))
    y[2, :2] = 255  # ignored pixels weigh nothing
    y[6:] = 0  # three all-background ("dropped") weak masks
    return net, x, y, np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7, 8])


def test_calibrated_offset_matches_the_strong_sets_class_fractions():
    # labels at the logits' resolution (FeatNet): at the offset, g_S's bias part, which is the
    # predicted minus the true fraction of each class, vanishes; an all-round shift is undone exactly
    net, x, y, strong, _ = _calib_case()
    items = _items(x, y)
    _, gb0 = reference_grad(net, items, strong.tolist(), _acc(), batch_size=3)
    shift, excess = calibrate_logits(net, items, strong.tolist(), _acc(), batch_size=3, with_excess=True)
    assert float(gb0.abs().max()) > 1e-2 and abs(float(shift.sum())) < 1e-5
    # the excess it reports is the network's own, before the offset (what dii/strong_fg_excess logs)
    assert abs(excess - float(gb0[1:].sum())) < 1e-5 and abs(excess) > 1e-2
    _, gb = reference_grad(net, items, strong.tolist(), _acc(), batch_size=3, logit_shift=shift)
    assert float(gb.abs().max()) < 1e-5
    with torch.no_grad():
        net.classifier.bias += torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64)
    moved = calibrate_logits(net, items, strong.tolist(), _acc(), batch_size=3)
    want = shift.double() - torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(moved.double(), want - want.mean(), atol=1e-4, rtol=0)


def test_calibrated_score_ignores_the_networks_foreground_bias():
    # dii.score=calibrated: the scores do not move when the classifier's bias does, while the paper's
    # score of the all-background masks changes sign once the network over-predicts foreground
    net, x, y, strong, weak = _calib_case()
    items = _items(x, y)

    def scores(kind):
        cfg = SimpleNamespace(strong_batches=0, scan="all", scan_size=0, scan_batch_size=4, score=kind)
        up = DIIUpdater(GammaState(len(weak)), items, strong, weak, cfg, seed=0)
        stats = up.update(net, _acc(), step=1)
        return up.last_scores.clone(), stats

    with torch.no_grad():
        net.classifier.bias.copy_(torch.tensor([2.0, -1.0, -1.0], dtype=torch.float64))  # under-predicts
    cal_under, st_under = scores("calibrated")
    paper_under, _ = scores("paper")
    with torch.no_grad():
        net.classifier.bias.copy_(torch.tensor([-2.0, 1.0, 1.0], dtype=torch.float64))  # over-predicts
    cal_over, st_over = scores("calibrated")
    paper_over, _ = scores("paper")
    torch.testing.assert_close(cal_over, cal_under, rtol=1e-4, atol=1e-7)
    assert st_over["dii/calibration_shift"] == pytest.approx(st_under["dii/calibration_shift"] - 6.0, abs=1e-3)
    dropped = slice(2, 5)  # weak ranks of the all-background masks
    assert torch.all(paper_under[dropped] < 0) and torch.all(paper_over[dropped] > 0)


def test_scaled_sgd_moves_each_gamma_by_its_own_score():
    # dii.optimizer=scaled_sgd: gamma_k -= lr * h_k / RMS(h) (h = -s, the hypergradient), then clip;
    # Adam's first step moves every gamma by lr whatever the score's size
    g = GammaState(4, init=0.5, lr=0.3, optimizer="scaled_sgd")
    h = torch.tensor([-1.0, -0.1, 0.2, 5.0])
    rms = float(h.square().mean().sqrt())
    g.step(torch.arange(4), h)
    torch.testing.assert_close(g.gamma, (0.5 - 0.3 * h / rms).clamp(0, 1))
    assert g.gamma[3] == 0.0 and g.updates == 1  # clipped
    a = GammaState(4, init=0.5, lr=0.1)
    a.step(torch.arange(4), h)
    torch.testing.assert_close(a.gamma, 0.5 - 0.1 * torch.sign(h), atol=1e-6, rtol=0)
    g.step(torch.tensor([1, 2]), torch.zeros(2))  # all scores zero: nothing moves
    assert g.updates == 2 and float(g.gamma[1]) == pytest.approx(0.5 + 0.3 * 0.1 / rms)
    g.step(torch.tensor([0]), torch.tensor([2.0]), lr_scale=0.5)  # a subset scan (RMS over it); the poly factor
    assert float(g.gamma[0]) == pytest.approx(0.5 + 0.3 / rms - 0.15)
    with pytest.raises(ValueError, match="scaled_sgd"):
        GammaState(2, optimizer="sgd")


def test_area_normalised_score_is_the_score_per_unit_of_foreground():
    # dii.normalize=area: s_k / max(predicted, annotated foreground fraction), floored at one pixel
    torch.manual_seed(5)
    B, F_, C, H = 5, 4, 3, 6
    net = FeatNet(F_, C).double()
    x = torch.randn(B, F_, H, H, dtype=torch.float64)
    y = torch.randint(0, C, (B, H, H))
    y[1, :, :] = 0  # an all-background mask
    y[2, :3] = 255  # ignored pixels are not foreground
    strong, weak = [0], [1, 2, 3, 4]
    gW, gb = reference_grad(net, _items(x, y), strong, _acc(), batch_size=2)
    plain = weak_scores(net, _items(x, y), weak, (gW, gb), _acc(), batch_size=2)
    per_area = weak_scores(net, _items(x, y), weak, (gW, gb), _acc(), batch_size=3, normalize="area")
    with torch.no_grad():
        z = net(x[weak])
    pred = (z.argmax(1) != 0).flatten(1).double().mean(1)
    ann = ((y[weak] != 0) & (y[weak] != 255)).flatten(1).double().mean(1)
    area = torch.maximum(pred, ann).clamp_min(1 / H ** 2)
    torch.testing.assert_close(per_area.double(), plain.double() / area, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(foreground_area(z, y[weak]).double(), area)
    # nothing predicted, nothing annotated: one pixel's area, so the score stays finite
    none = foreground_area(torch.tensor([[1.0, -1.0]]).view(1, 2, 1, 1).expand(1, 2, 4, 4), torch.zeros(1, 8, 8).long())
    assert float(none) == pytest.approx(1 / 64)
    with pytest.raises(ValueError, match="normalize"):
        dii_scores(x[:1], z[:1], y[:1], gW.double(), gb.double(), normalize="pixels")


def _missed_polyps_case():
    """A network that segments: p(fg) = 0.9 on polyp pixels (feature 0), 0.005 elsewhere. Image 0 (strong)
    is labelled exactly; images 1 and 2 have their polyp dropped (all background): a small polyp of 2
    pixels and a large one of 16, in an 8x8 image."""
    net = _polyp_feature_net(p_polyp=0.9, p_background=0.005)
    h = torch.zeros(3, 2, 8, 8)
    h[:, 1] = 1.0
    h[0, 0, :4, :2] = 1.0  # strong: an 8-pixel polyp
    h[1, 0, 0, :2] = 1.0  # 2 pixels
    h[2, 0, :4, :4] = 1.0  # 16 pixels
    y = torch.zeros(3, 8, 8, dtype=torch.long)
    y[0] = h[0, 0].long()
    return net, _items(h, y)


def test_area_normalisation_weighs_a_missed_small_polyp_like_a_large_one():
    # The paper's score of a dropped annotation grows with its polyp's area: a missed small polyp looks
    # almost harmless (benchmarks/RESULTS.md, section 5). Per unit of foreground, the two are alike.
    net, items = _missed_polyps_case()
    ref = reference_grad(net, items, [0], _acc(), batch_size=3)
    plain = weak_scores(net, items, [1, 2], ref, _acc(), batch_size=3)
    per_area = weak_scores(net, items, [1, 2], ref, _acc(), batch_size=3, normalize="area")
    assert torch.all(plain < 0) and torch.all(per_area < 0)
    assert float(plain[1] / plain[0]) > 4  # 16 pixels against 2
    assert 0.5 < float(per_area[1] / per_area[0]) < 2


def test_median_sgd_moves_each_gamma_by_its_score_against_the_median_clipped():
    # dii.optimizer=median_sgd: gamma_k -= lr * clip(h_k / median |h|, -step_clip, step_clip), then clip to
    # dii.clip. One huge score sets neither the others' steps (as an RMS would) nor its own beyond the clip.
    h = torch.tensor([-1.0, 0.5, 2.0, 400.0, -0.25])  # median |h| = 1
    g = GammaState(5, init=0.5, lr=0.1, optimizer="median_sgd", step_clip=3.0)
    g.step(torch.arange(5), h)
    torch.testing.assert_close(g.gamma, torch.tensor([0.6, 0.45, 0.3, 0.2, 0.525]), rtol=0, atol=1e-6)
    rms = GammaState(5, init=0.5, lr=0.1, optimizer="scaled_sgd")
    rms.step(torch.arange(5), h)
    assert float((rms.gamma[:3] - 0.5).abs().max()) < 0.002  # under the RMS, the others barely move
    g.step(torch.tensor([0, 1]), torch.zeros(2))  # all zero: nothing moves
    assert g.updates == 2 and float(g.gamma[0]) == pytest.approx(0.6)
    g.step(torch.tensor([0, 2, 4]), torch.tensor([-2.0, 1.0, 6.0]), lr_scale=0.5)  # median 2, x lr x 0.5
    torch.testing.assert_close(g.gamma[[0, 2, 4]], torch.tensor([0.65, 0.275, 0.375]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="median_sgd"):
        GammaState(2, optimizer="median")
    with pytest.raises(ValueError, match="step_clip"):
        GammaState(2, optimizer="median_sgd", step_clip=0)
    from hybrid_accel.config import ConfigError, load_config, validate_config

    validate_config(load_config(None, ["dii.optimizer=median_sgd", "dii.normalize=area", "dii.step_clip=2"]))
    for bad in ("dii.step_clip=0", "dii.normalize=pixels", "dii.optimizer=median"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            validate_config(load_config(None, [bad]))


# ------------------------------------------------------------------------------------- ScanCache
class _CountingDataset(torch.utils.data.Dataset):
    """A real HybridDataset, with a count of the items it loaded."""

    def __init__(self, ds):
        self.ds, self.loads = ds, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.loads += 1
        return self.ds[i]


@pytest.fixture(scope="module")
def synth_train(tmp_path_factory):
    from hybrid_accel.data import HybridDataset, make_synthetic_hybrid

    root = tmp_path_factory.mktemp("scan-cache")
    make_synthetic_hybrid(root, n_train=14, n_val=2, n_test=2, size=(24, 32), strong_count=4, seed=0, workers=1)
    return HybridDataset(root, "train", image_size=(24, 32))


def _loader_batches(ds, indices, bs):
    from torch.utils.data import DataLoader, Subset

    return [{"image": b["image"], "mask": b["mask"]} for b in DataLoader(Subset(ds, indices), batch_size=bs)]


@pytest.mark.parametrize("budget_items", [100, 5, 0])
def test_scan_cache_gives_the_dataloaders_batches_and_loads_each_item_once(synth_train, budget_items):
    ds = _CountingDataset(synth_train)
    item = synth_train[0]
    size = item["image"].numel() * 4 + item["mask"].numel()  # float32 image, uint8 mask
    cache = ScanCache(ds, budget_items * size)
    order = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]  # repeats, as a strong draw with strong_batches makes
    want = _loader_batches(synth_train, order, 4)
    for rep in range(3):
        got = list(cache.batches(order, 4))
        assert [len(b["image"]) for b in got] == [4, 4, 4, 2]
        for g, w in zip(got, want):
            assert torch.equal(g["image"], w["image"])
            assert g["mask"].dtype == w["mask"].dtype == torch.int64 and torch.equal(g["mask"], w["mask"])
        if rep == 0:
            assert ds.loads == len(order)  # each position loaded once on the first pass (repeats included)
            assert cache.cached == min(budget_items, len(set(order)))
            assert cache.nbytes <= cache.max_bytes
    uncached_positions = sum(1 for i in order if i not in cache._items)
    assert ds.loads == len(order) + 2 * uncached_positions  # later passes load only what did not fit
    if budget_items >= len(set(order)):
        assert ds.loads == len(order)


def test_scan_cache_loads_through_workers(synth_train):
    cache = ScanCache(synth_train, 2**30)
    order = list(range(len(synth_train)))
    want = _loader_batches(synth_train, order, 5)
    for _ in range(2):  # first pass through one worker process, second from memory
        got = list(cache.batches(order, 5, num_workers=1))
        assert all(torch.equal(g["image"], w["image"]) and torch.equal(g["mask"], w["mask"]) for g, w in zip(got, want))
    assert cache.cached == len(order)


def test_updater_with_scan_cache_gives_the_same_gamma_and_reads_the_images_once(synth_train):
    torch.manual_seed(0)
    from hybrid_accel.model import build_model

    net = build_model("resnet18", synth_train.num_classes, decoder_channels=16).eval()
    strong, weak = synth_train.strong_indices, synth_train.weak_indices
    cfg = SimpleNamespace(strong_batches=0, scan="all", scan_size=0, scan_batch_size=4, score="centred",
                          normalize="area")
    runs = {}
    for cache_bytes in (0, 2**30):
        ds = _CountingDataset(synth_train)
        up = DIIUpdater(GammaState(len(weak), init=0.5), ds, strong, weak, cfg, seed=0, cache_bytes=cache_bytes)
        for step in (10, 20, 30):
            up.update([net, net], _acc(), step=step)  # dii.networks=both reads every image once per network
        runs[cache_bytes] = (up.gamma.gamma.clone(), up.last_scores.clone(), ds.loads)
    assert torch.equal(runs[0][0], runs[2**30][0]) and torch.equal(runs[0][1], runs[2**30][1])
    n = len(strong) + len(weak)
    assert runs[0][2] == 3 * 2 * n and runs[2**30][2] == n


def test_scan_cache_config_is_checked():
    from hybrid_accel.config import Config, ConfigError, validate_config

    cfg = Config()
    cfg.dii.scan_cache_mib = -1
    with pytest.raises(ConfigError, match="dii.scan_cache_mib"):
        validate_config(cfg)
