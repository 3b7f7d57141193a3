import math

import pytest
import torch

from hybrid_accel.losses import per_instance_ce, per_instance_kl, weighted_ce, weighted_mean


def _hand_ce(logits, target, ignore_index=255):
    """Per-instance CE by explicit loops over pixels (float64)."""
    b, c, h, w = logits.shape
    out = []
    for k in range(b):
        total, count = 0.0, 0
        for i in range(h):
            for j in range(w):
                t = int(target[k, i, j])
                if t == ignore_index:
                    continue
                z = logits[k, :, i, j].double()
                total += float(torch.logsumexp(z, 0) - z[t])
                count += 1
        out.append(total / count if count else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def test_per_instance_ce_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (3, 5, 6), generator=g)
    target[0, :2] = 255  # partly ignored
    target[2] = 255  # fully ignored: loss 0
    got = per_instance_ce(logits, target)
    want = _hand_ce(logits, target)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert got[2] == 0.0


def test_per_instance_ce_is_not_the_batch_mean_over_pixels():
    # Instance 0 has 1 valid pixel, instance 1 has 30: per-instance means weigh them equally.
    logits = torch.zeros(2, 2, 5, 6)
    target = torch.full((2, 5, 6), 255)
    target[0, 0, 0] = 1
    target[1] = 0
    logits[0, 1, 0, 0] = -3.0
    got = per_instance_ce(logits, target)
    assert got[0].item() == pytest.approx(math.log(1 + math.exp(3.0)), rel=1e-6)
    assert got[1].item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_other_ignore_index():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[:, 0] = -1
    torch.testing.assert_close(per_instance_ce(logits, target, ignore_index=-1).double(),
                               _hand_ce(logits, target, ignore_index=-1), rtol=1e-6, atol=1e-6)


def test_weighted_ce_and_gradient_of_empty_instance():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    target = torch.randint(0, 2, (3, 4, 4), generator=g)
    target[1] = 255
    w = torch.tensor([0.2, 1.0, 0.7])
    loss = weighted_ce(logits, target, w)
    per = per_instance_ce(logits, target)
    assert loss.item() == pytest.approx(float((w * per.detach()).sum() / 3), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[1] == 0)
    assert torch.isfinite(logits.grad).all()
    assert weighted_mean(per.detach()).item() == pytest.approx(per.detach().mean().item())


def test_weighted_ce_under_bf16_autocast_is_float32():
    logits = torch.randn(2, 3, 4, 4).bfloat16()
    target = torch.randint(0, 3, (2, 4, 4))
    assert per_instance_ce(logits, target).dtype == torch.float32


def test_kl_soft_targets_match_hand_computation():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    p = torch.randn(2, 3, 4, 5, generator=g).softmax(1)
    p[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # zero probabilities must not give NaN
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    valid[1, :2] = False
    got = per_instance_kl(logits, p, valid=valid)
    logq = logits.double().log_softmax(1)
    pd = p.double()
    kl = torch.where(pd > 0, pd * (pd.clamp_min(1e-300).log() - logq), torch.zeros_like(pd)).sum(1)
    want = torch.stack([(kl[k] * valid[k]).sum() / valid[k].sum() for k in range(2)])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # KL of a distribution with itself is zero
    same = per_instance_kl(logits, logits.softmax(1))
    torch.testing.assert_close(same, torch.zeros(2), atol=1e-6, rtol=0)


def test_kl_hard_labels_equal_ce():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0] = 255
    torch.testing.assert_close(per_instance_kl(logits, target), per_instance_ce(logits, target))
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    assert torch.all(per_instance_kl(logits, target, valid=valid) == 0)


def test_shape_errors():
    with pytest.raises(ValueError):
        per_instance_ce(torch.randn(2, 3, 4, 4), torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError):
        weighted_ce(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError):
        per_instance_kl(torch.randn(2, 3, 4, 4), torch.rand(2, 2, 4, 4))
