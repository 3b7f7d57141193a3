"""Backbones side by side: training-step throughput of DeepLabv3+ on each encoder.

    python benchmarks/bench_backbones.py --out benchmarks/results/bench_backbones_cpu.json

One training step = forward + backward + optimiser step of one network on a batch (fp32 unless
``--amp``), cross-entropy against random labels, in ``train()`` mode. Reported per backbone: the
median step time over ``--steps`` timed steps after ``--warmup`` untimed ones, images/s, and the
parameter count. The weights are random (throughput does not depend on them), so the script needs
no weight package. Run it on an idle machine: a second busy process halves the figures.
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

from hybrid_accel.model import build_model  # noqa: E402

DEFAULT = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "resnet18", "resnet50"]


def step_times(backbone: str, size: int, batch: int, steps: int, warmup: int, device: torch.device,
               decoder_channels: int, amp: str | None) -> tuple[list[float], int]:
    torch.manual_seed(0)
    net = build_model(backbone, 2, decoder_channels=decoder_channels).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 2, (batch, size, size), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, sum(p.numel() for p in net.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", nargs="+", default=DEFAULT)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--decoder-channels", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    print(f"{'backbone':24s} {'params (M)':>10s} {'step (s)':>9s} {'images/s':>9s}")
    for name in args.backbones:
        times, n_params = step_times(name, args.size, args.batch, args.steps, args.warmup, device,
                                     args.decoder_channels, args.amp)
        med = statistics.median(times)
        rows.append({"backbone": name, "params": n_params, "step_s": med, "images_per_s": args.batch / med,
                     "step_times_s": times})
        print(f"{name:24s} {n_params / 1e6:10.1f} {med:9.3f} {args.batch / med:9.1f}", flush=True)
    meta = {"size": args.size, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "decoder_channels": args.decoder_channels, "device": str(device), "amp": args.amp,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
