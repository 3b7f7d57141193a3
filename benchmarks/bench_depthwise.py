"""Depthwise convolutions on the CPU: PyTorch's backward against hybrid_accel.depthwise's.

    python benchmarks/bench_depthwise.py --out benchmarks/results/bench_depthwise_cpu.json

Two parts, both on one thread (``--threads``) with the reproduction suite's network and sizes
(EfficientNet-Lite0 DeepLabv3+, output stride 16, decoder width 64, 96x128 images, 24 images: the
3 x 8 of one network's DCR step):
1. each depthwise layer of the encoder, at the input it receives: the time of the forward, of
   PyTorch's input gradient (``aten::convolution_backward``) and of ours (a forward convolution), and
   of the weight gradient (PyTorch's kernel, which both use);
2. the whole training step (forward + backward of one network, cross-entropy on random labels), with
   ``fast_depthwise`` off and on, alternated, median of ``--steps`` steps each.
Run it on an idle machine.
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

from hybrid_accel.depthwise import DepthwiseConv2d, DepthwiseConv2dSame, _input_grad  # noqa: E402
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
    nets = {fast: build_model(a.backbone, 2, decoder_channels=64, fast_depthwise=fast).train() for fast in (False, True)}
    nets[True].load_state_dict(nets[False].state_dict())

    layers = []
    cb = torch.ops.aten.convolution_backward
    for L in layer_inputs(nets[True], x):
        xi, w, s, pd, d = L["x"], L["w"], L["stride"], L["padding"], L["dilation"]
        c = xi.shape[1]
        go = torch.randn_like(F.conv2d(xi, w, None, s, pd, d, c))
        args = (go, xi, w, None, list(s), list(pd), list(d), False, [0, 0], c)
        ref = cb(*args, [True, False, False])[0]
        ours = _input_grad(go, w, xi.shape, s, pd, d)
        layers.append(dict(
            input=list(xi.shape), kernel=list(w.shape[-2:]), stride=list(s), padding=list(pd), dilation=list(d),
            forward_ms=_median_ms(lambda: F.conv2d(xi, w, None, s, pd, d, c), a.reps),
            input_grad_torch_ms=_median_ms(lambda: cb(*args, [True, False, False]), a.reps),
            input_grad_ours_ms=_median_ms(lambda: _input_grad(go, w, xi.shape, s, pd, d), a.reps),
            weight_grad_ms=_median_ms(lambda: cb(*args, [False, True, False]), a.reps),
            input_grad_max_rel_diff=float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)),
        ))

    def step(net):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    times = {False: [], True: []}
    for fast in (False, True):
        step(nets[fast])
    for _ in range(a.steps):
        for fast in (False, True):
            t0 = time.perf_counter()
            step(nets[fast])
            times[fast].append(time.perf_counter() - t0)
    step_ms = {("fast" if k else "torch"): 1000 * statistics.median(v) for k, v in times.items()}

    print(f"{a.backbone} DeepLabv3+, {a.batch} images of {a.size[0]}x{a.size[1]}, {a.threads} thread(s), "
          f"torch {torch.__version__}, {platform.machine()}\n")
    print("| input | kernel | stride | dilation | forward | input grad, PyTorch | input grad, ours | weight grad |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in layers:
        print(f"| {r['input']} | {r['kernel'][0]}x{r['kernel'][1]} | {r['stride'][0]} | {r['dilation'][0]} | "
              f"{r['forward_ms']:.1f} | {r['input_grad_torch_ms']:.1f} | {r['input_grad_ours_ms']:.1f} | "
              f"{r['weight_grad_ms']:.1f} |")
    tot_t = sum(r["input_grad_torch_ms"] for r in layers)
    tot_o = sum(r["input_grad_ours_ms"] for r in layers)
    print(f"| all {len(layers)} layers | | | | {sum(r['forward_ms'] for r in layers):.1f} | {tot_t:.1f} | {tot_o:.1f} | "
          f"{sum(r['weight_grad_ms'] for r in layers):.1f} |")
    print(f"\ntraining step (forward + backward), median of {a.steps}: PyTorch's backward {step_ms['torch']:.0f} ms, "
          f"fast_depthwise {step_ms['fast']:.0f} ms ({step_ms['torch'] / step_ms['fast']:.2f}x)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(
            backbone=a.backbone, batch=a.batch, size=a.size, threads=a.threads, torch=torch.__version__,
            machine=platform.machine(), layers=layers, step_ms=step_ms), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
