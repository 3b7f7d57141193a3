"""Depthwise convolutions on the CPU: PyTorch's backward against hybrid_accel.depthwise's.

    python benchmarks/bench_depthwise.py --out benchmarks/results/bench_depthwise_cpu.json

Two parts, both on one thread (``--threads``) with the reproduction suite's network and sizes
(EfficientNet-Lite0 DeepLabv3+, output stride 16, decoder width 64, 96x128 images, 24 images: the
3 x 8 of one network's DCR step):
1. each depthwise layer of the encoder, at the input it receives: the forward; the input gradient and
   the weight gradient, PyTorch's (``aten::convolution_backward`` asked for one) and ours (a forward
   depthwise convolution each); the whole backward, PyTorch's (both gradients in one call, as autograd
   asks for them) and what ``fast_depthwise`` runs (ours on the layers it switches: our weight gradient,
   and our input gradient on dilated layers, PyTorch's on the others);
2. the training step (forward + backward of one network, cross-entropy on random labels) with PyTorch's
   backward, with ``fast_depthwise`` (the default: layers larger than 3x3 or dilated) and with ours on
   every depthwise layer, interleaved, median and minimum of ``--steps`` steps each.
The machine's speed drifts from minute to minute (a shared 2-core VM): compare figures of one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_accel.depthwise import (  # noqa: E402
    DepthwiseConv2d,
    DepthwiseConv2dSame,
    _backward,
    _input_grad,
    _slow_in_pytorch,
    _weight_grad,
    use_fast_depthwise,
)
from hybrid_accel.model import build_model  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def layer_inputs(net: torch.nn.Module, x: torch.Tensor) -> list[dict]:
    """(input, stride, padding, dilation, weight) of each depthwise layer, as the forward meets them."""
    from timm.layers import pad_same

    seen = []

    def hook(m, inp, out):
        t = inp[0]
        pad = m.padding
        if isinstance(m, DepthwiseConv2dSame):  # TensorFlow 'SAME': padded first, then a convolution without
            t, pad = pad_same(t, m.weight.shape[-2:], m.stride, m.dilation), (0, 0)
        seen.append(dict(x=t.detach(), w=m.weight.detach(), stride=tuple(m.stride), padding=tuple(pad),
                         dilation=tuple(m.dilation)))

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, (DepthwiseConv2d, DepthwiseConv2dSame))]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return seen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--size", type=int, nargs=2, default=[96, 128])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per layer measurement")
    p.add_argument("--steps", type=int, default=9, help="timed training steps per setting")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, *a.size)
    y = torch.randint(0, 2, (a.batch, *a.size))
    nets = {"torch": build_model(a.backbone, 2, decoder_channels=64, fast_depthwise=False).train()}
    nets["default"] = build_model(a.backbone, 2, decoder_channels=64, fast_depthwise=True).train()
    nets["every"] = build_model(a.backbone, 2, decoder_channels=64, fast_depthwise=False).train()
    use_fast_depthwise(nets["every"], every_layer=True)
    for net in nets.values():
        net.load_state_dict(nets["torch"].state_dict())

    layers = []
    cb = torch.ops.aten.convolution_backward
    for L in layer_inputs(nets["every"], x):
        xi, w, s, pd, d = L["x"], L["w"], L["stride"], L["padding"], L["dilation"]
        c, k = xi.shape[1], tuple(w.shape[-2:])
        go = torch.randn_like(F.conv2d(xi, w, None, s, pd, d, c))
        args = (go, xi, w, None, list(s), list(pd), list(d), False, [0, 0], c)
        ref_gx, ref_gw, _ = cb(*args, [True, True, False])
        ours_gx, ours_gw = _input_grad(go, w, xi.shape, s, pd, d), _weight_grad(xi, go, k, s, pd, d)
        switched = _slow_in_pytorch(k, d)
        if switched:  # what fast_depthwise runs on this layer: the module's backward
            def default_bwd():
                return _backward(go, xi, w, s, pd, d)
        else:  # PyTorch's
            def default_bwd():
                return cb(*args, [True, True, False])
        layers.append(dict(
            input=list(xi.shape), kernel=list(k), stride=list(s), padding=list(pd), dilation=list(d),
            switched_by_default=switched,
            forward_ms=_median_ms(lambda: F.conv2d(xi, w, None, s, pd, d, c), a.reps),
            input_grad_torch_ms=_median_ms(lambda: cb(*args, [True, False, False]), a.reps),
            input_grad_ours_ms=_median_ms(lambda: _input_grad(go, w, xi.shape, s, pd, d), a.reps),
            weight_grad_torch_ms=_median_ms(lambda: cb(*args, [False, True, False]), a.reps),
            weight_grad_ours_ms=_median_ms(lambda: _weight_grad(xi, go, k, s, pd, d), a.reps),
            backward_torch_ms=_median_ms(lambda: cb(*args, [True, True, False]), a.reps),
            backward_default_ms=_median_ms(default_bwd, a.reps),
            input_grad_max_rel_diff=float((ours_gx - ref_gx).abs().max() / ref_gx.abs().max().clamp_min(1e-30)),
            weight_grad_max_rel_diff=float((ours_gw - ref_gw).abs().max() / ref_gw.abs().max().clamp_min(1e-30)),
        ))

    def step(net):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    times = {k: [] for k in nets}
    for net in nets.values():
        step(net)
    for _ in range(a.steps):
        for k, net in nets.items():
            t0 = time.perf_counter()
            step(net)
            times[k].append(time.perf_counter() - t0)
    step_ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    step_min_ms = {k: 1000 * min(v) for k, v in times.items()}

    print(f"{a.backbone} DeepLabv3+, {a.batch} images of {a.size[0]}x{a.size[1]}, {a.threads} thread(s), "
          f"torch {torch.__version__}, {platform.machine()}; times in ms, median of {a.reps}\n")
    print("| input | kernel | stride | dilation | switched | forward | input grad: PyTorch | ours | "
          "weight grad: PyTorch | ours | backward: PyTorch | fast_depthwise |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    keys = ("forward_ms", "input_grad_torch_ms", "input_grad_ours_ms", "weight_grad_torch_ms", "weight_grad_ours_ms",
            "backward_torch_ms", "backward_default_ms")
    for r in layers:
        print(f"| {r['input']} | {r['kernel'][0]}x{r['kernel'][1]} | {r['stride'][0]} | {r['dilation'][0]} | "
              f"{'yes' if r['switched_by_default'] else 'no'} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    print(f"| all {len(layers)} layers | | | | | " + " | ".join(f"{sum(r[k] for r in layers):.1f}" for k in keys) + " |")
    print(f"\ntraining step (forward + backward), median / minimum of {a.steps}: PyTorch's backward "
          f"{step_ms['torch']:.0f} / {step_min_ms['torch']:.0f} ms; fast_depthwise (the default) "
          f"{step_ms['default']:.0f} / {step_min_ms['default']:.0f} ms "
          f"({step_ms['torch'] / step_ms['default']:.2f}x on the median); ours on every depthwise layer "
          f"{step_ms['every']:.0f} / {step_min_ms['every']:.0f} ms")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(
            backbone=a.backbone, batch=a.batch, size=a.size, threads=a.threads, torch=torch.__version__,
            machine=platform.machine(), layers=layers, step_ms=step_ms, step_min_ms=step_min_ms), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
