"""The depthwise convolution with the CPU backward taken as forward convolutions: PyTorch's gradients, exactly."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame

from hybrid_accel.depthwise import DepthwiseConv2d, DepthwiseConv2dSame, depthwise_conv2d, use_fast_depthwise
from hybrid_accel.model import build_model

SMALL = dict(decoder_channels=16, low_level_channels=8, aspp_dropout=0.0)  # no dropout: runs compare exactly

# (N, C, H, W, kernel, stride, padding, dilation): same padding, none, more than the kernel reaches
# (p > d (k - 1): the input gradient's padding is negative), strides that leave input rows no output reads
CASES = [(2, 3, 9, 11, 3, 1, 1, 1), (2, 3, 9, 11, 5, 2, 0, 1), (2, 4, 10, 7, 5, 2, 2, 1), (2, 4, 6, 8, 5, 1, 4, 2),
         (1, 2, 7, 9, 3, 3, 1, 2), (2, 3, 8, 8, 3, 1, 0, 1), (2, 3, 8, 8, 3, 2, 3, 1), (1, 2, 5, 6, 3, 1, 5, 2),
         (1, 2, 6, 9, (3, 5), (1, 2), (1, 0), (2, 1))]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_are_pytorchs(case):
    n, c, h, w, k, s, p, d = case
    kh, kw = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=g, requires_grad=True)
    wt = torch.randn(c, 1, kh, kw, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: depthwise_conv2d(*t, s, p, d), (x, wt, b))
    ref = F.conv2d(x, wt, b, s, p, d, c)
    out = depthwise_conv2d(x, wt, b, s, p, d)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    go = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    for a, e in zip(torch.autograd.grad(out, (x, wt, b), go), torch.autograd.grad(ref, (x, wt, b), go)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_only_the_gradients_asked_for():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    wt = torch.randn(3, 1, 3, 3)  # frozen weight, no bias: only the input gradient
    (gx,) = torch.autograd.grad(depthwise_conv2d(x, wt, None, 1, 1).sum(), x)
    (ref,) = torch.autograd.grad(F.conv2d(x, wt, None, 1, 1, 1, 3).sum(), x)
    torch.testing.assert_close(gx, ref)
    wt.requires_grad_(True)
    x2 = x.detach()  # frozen input (a first layer): only the weight gradient
    (gw,) = torch.autograd.grad(depthwise_conv2d(x2, wt, None, 1, 1).sum(), wt)
    (ref,) = torch.autograd.grad(F.conv2d(x2, wt, None, 1, 1, 1, 3).sum(), wt)
    torch.testing.assert_close(gw, ref)
    with torch.no_grad():  # nothing to differentiate: PyTorch's convolution, no graph
        assert depthwise_conv2d(x, wt, None, 1, 1).grad_fn is None


def test_a_weight_that_is_not_depthwise_is_an_error():
    with pytest.raises(ValueError, match=r"\[4, 1, kh, kw\]"):
        depthwise_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3))


def test_only_depthwise_zero_padded_convolutions_are_switched():
    m = torch.nn.Sequential(
        torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),  # dilated depthwise: switched
        Conv2dSame(4, 4, 5, stride=2, groups=4),  # timm 'SAME', 5x5 depthwise: switched
        torch.nn.Conv2d(4, 4, 3, padding=1, groups=4),  # 3x3 undilated depthwise: only with every_layer=True
        torch.nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=4),  # grouped, not depthwise
        torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2),  # dense
        torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, padding_mode="reflect"),  # not zero padding
        torch.nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=4),  # padding given as a word
    )
    plain = [type(x) for x in m]
    assert use_fast_depthwise(m) == 2
    assert [type(x) for x in m] == [DepthwiseConv2d, DepthwiseConv2dSame, *plain[2:]]
    assert use_fast_depthwise(m, every_layer=True) == 1  # the 3x3 undilated one; the others are switched already
    assert [type(x) for x in m] == [DepthwiseConv2d, DepthwiseConv2dSame, DepthwiseConv2d, *plain[3:]]
    assert use_fast_depthwise(m, every_layer=True) == 0
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    with torch.no_grad():
        ref = [torch.nn.functional.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
               for c in (m[0], m[2])]
    torch.testing.assert_close(m[0](x), ref[0], rtol=0, atol=0)
    torch.testing.assert_close(m[2](x), ref[1], rtol=0, atol=0)


@pytest.mark.parametrize("backbone, output_stride, every_layer",
                         [("tf_efficientnet_lite0", 16, False), ("tf_efficientnet_lite0", 16, True),
                          ("mobilenetv3_small_050", 8, False)])
def test_model_outputs_and_gradients_unchanged(backbone, output_stride, every_layer):
    # tf_efficientnet_lite0 at output stride 16: 3x3 and 5x5 depthwise layers, dilated ones in the last stages,
    # timm Conv2dSame at the strided ones
    torch.manual_seed(0)
    ref = build_model(backbone, output_stride=output_stride, fast_depthwise=False, **SMALL).double().train()
    if not every_layer:
        fast = build_model(backbone, output_stride=output_stride, **SMALL).double().train()
    else:
        fast = build_model(backbone, output_stride=output_stride, fast_depthwise=False, **SMALL).double().train()
        assert use_fast_depthwise(fast, every_layer=True) > 0
    fast.load_state_dict(ref.state_dict())
    assert fast.state_dict().keys() == ref.state_dict().keys()
    switched = [m for m in fast.modules() if isinstance(m, (DepthwiseConv2d, DepthwiseConv2dSame))]
    assert switched and not [m for m in ref.modules() if isinstance(m, (DepthwiseConv2d, DepthwiseConv2dSame))]
    assert all(max(m.dilation) > 1 or max(m.kernel_size) > 3 for m in switched) != every_layer
    assert any(max(m.dilation) > 1 for m in switched) and any(max(m.dilation) == 1 for m in switched)
    if backbone.startswith("tf_"):
        assert any(isinstance(m, DepthwiseConv2dSame) for m in switched)
    x = torch.randn(2, 3, 40, 56, dtype=torch.float64)
    grads = []
    for net in (ref, fast):
        out = net(x)
        (out.square().mean()).backward()
        grads.append([p.grad for p in net.parameters()])
        torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_the_trainer_setting_reaches_the_networks():
    from hybrid_accel.config import load_config

    for on in (True, False):
        cfg = load_config(None, ["model.backbone=tf_efficientnet_lite0", "model.pretrained=null",
                                 f"model.fast_depthwise={str(on).lower()}"])
        net = build_model(cfg.model.backbone, 2, fast_depthwise=cfg.model.fast_depthwise)
        assert any(isinstance(m, DepthwiseConv2d) for m in net.modules()) == on


def test_switched_model_copies_and_pickles():
    net = build_model("mobilenetv3_small_050", output_stride=8, **SMALL)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    for other in (copy.deepcopy(net), torch.load(buf, weights_only=False)):
        assert DepthwiseConv2d in {type(m) for m in other.modules()}
        other.load_state_dict(net.state_dict())


def test_compiles_with_the_switched_convolutions():
    torch.manual_seed(1)
    ref = build_model("mobilenetv3_small_050", output_stride=8, fast_depthwise=False, **SMALL).double().train()
    comp = build_model("mobilenetv3_small_050", output_stride=8, **SMALL).double().train()
    assert any(isinstance(m, DepthwiseConv2d) for m in comp.modules())
    comp.load_state_dict(ref.state_dict())
    comp.compile(backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref(x).square().mean().backward()
    comp(x).square().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), comp.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_benchmark_runs_and_agrees(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_depthwise

    out = tmp_path / "bench.json"
    assert bench_depthwise.main(["--batch", "2", "--size", "32", "48", "--reps", "1", "--steps", "1",
                                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["layers"]) == 16  # EfficientNet-Lite0's depthwise layers
    assert {(r["stride"][0], r["dilation"][0]) for r in doc["layers"]} == {(1, 1), (2, 1), (1, 2)}
    assert max(r["input_grad_max_rel_diff"] for r in doc["layers"]) < 1e-5
    assert [r["switched_by_default"] for r in doc["layers"]] == [r["dilation"][0] > 1 or r["kernel"][0] > 3
                                                                 for r in doc["layers"]]
    assert sum(r["switched_by_default"] for r in doc["layers"]) == 10  # six 5x5, four dilated
    assert max(r["weight_grad_max_rel_diff"] for r in doc["layers"]) < 1e-5
    assert set(doc["step_ms"]) == {"torch", "default", "every"} and min(doc["step_ms"].values()) > 0
