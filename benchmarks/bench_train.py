"""Trainer cost figures: DCR step throughput, DII update cost, DII's share of wall time.

    python benchmarks/bench_train.py                                   # CPU, small backbone
    python benchmarks/bench_train.py --device cuda --backbone resnet50 --size 512 --batch 16 --amp bf16 \\
        --out results_h100.json

1. DCR step vs a plain supervised step, same backbone and batch ``B``: the plain step is one
   network, forward + backward + SGD on B images (B image-passes); the DCR step is two networks,
   each one forward + backward over ``cat[x_i, x_j, x_m]`` (6B image-passes) with the paste, the
   pseudo labels and the loss of hybrid_accel.dcr. Reported: image-passes/s of each and their ratio
   (target >= 90%).
2. One DII update (strong reference gradient + weak scan, hybrid_accel.dii, eval mode, no_grad)
   against an inference pass (eval-mode forward) over the same images: target <= 1.3x.
3. DII's share of wall time at the paper's settings (tau = 400 steps, 55 strong + 11,000 weak
   images scanned in full, batch 16): ``dii / (dii + tau * t_dcr_step)`` from the measured per-image
   DII cost and the measured DCR step time at the benchmark's batch, scaled to batch 16.
   Target <= 10%.

Timings are medians of synchronised per-iteration times (torch.cuda.synchronize on GPUs), after
warm-up; data comes from memory (no decoding), so the figures are the trainer's compute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_accel.dcr import dcr_forward, dcr_loss, make_mix  # noqa: E402
from hybrid_accel.dii import reference_grad, weak_scores  # noqa: E402
from hybrid_accel.losses import per_instance_ce, weighted_mean  # noqa: E402
from hybrid_accel.model import build_model  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(fn, device) -> float | None:
    """Peak GPU memory of one call of ``fn`` above what was allocated before it (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def median_time(fn, device, n: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _synthetic_batch(B, C, size, device, gen):
    x = torch.randn(B, 3, size, size, generator=gen).to(device)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    y = torch.zeros(B, size, size, dtype=torch.long)
    for b in range(B):  # one disc of foreground per image
        cy, cx, r = torch.randint(size // 4, 3 * size // 4, (3,), generator=gen).tolist()
        y[b][((yy - cy) ** 2 + (xx - cx) ** 2) < (r // 2) ** 2] = 1 + b % (C - 1)
    return x, y.to(device)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--decoder-channels", type=int, default=None, help="default: 64 on CPU, 256 on GPU")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--amp", choices=("no", "bf16", "fp16"), default="no")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per figure")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--scan-images", type=int, default=None, help="images in the DII/inference comparison (default 4 batches)")
    ap.add_argument("--scan-batch", type=int, default=None, help="DII scan batch (default 64 on GPU, 2x batch on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--paper-weak", type=int, default=11000)
    ap.add_argument("--paper-strong", type=int, default=55)
    ap.add_argument("--paper-tau", type=int, default=400)
    ap.add_argument("--paper-batch", type=int, default=16)
    ap.add_argument("--machine", default=None, help="machine description for the table")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of 3 DCR steps to this file")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    F_ = a.decoder_channels or (256 if gpu else 64)
    scan_batch = a.scan_batch or (64 if gpu else 2 * a.batch)
    n_scan = a.scan_images or 4 * scan_batch
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=a.amp == "fp16")
    gen = torch.Generator().manual_seed(0)
    B, C = a.batch, a.classes

    def net():
        return build_model(a.backbone, C, decoder_channels=F_, channels_last=a.channels_last).to(device).train()

    # ---- 1. plain step vs DCR step
    plain = net()
    opt_p = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    x_i, y_i = _synthetic_batch(B, C, a.size, device, gen)
    x_j, y_j = _synthetic_batch(B, C, a.size, device, gen)

    def make_plain_step(x, y):
        w = torch.ones(x.shape[0], device=device)

        def step():
            with autocast():
                loss = weighted_mean(per_instance_ce(plain(x), y), w)
            scaler.scale(loss).backward()
            scaler.step(opt_p)
            scaler.update()
            opt_p.zero_grad(set_to_none=True)

        return step

    plain_step = make_plain_step(x_i, y_i)
    w = torch.ones(B, device=device)

    n1, n2 = net(), net()
    opt_d = torch.optim.SGD(list(n1.parameters()) + list(n2.parameters()), lr=1e-3, momentum=0.9)
    pg = torch.Generator().manual_seed(1)

    def dcr_step():
        mix = make_mix(x_i, x_j, y_i, C, "foreground", generator=pg)
        with autocast():
            o1, o2 = dcr_forward(n1, n2, x_i, x_j, mix)
            loss, _ = dcr_loss(o1, o2, y_i, y_j, w, w, mix, x_i, x_j, 4.0)
        scaler.scale(loss).backward()
        scaler.step(opt_d)
        scaler.update()
        opt_d.zero_grad(set_to_none=True)

    t_plain = median_time(plain_step, device, a.iters, a.warmup)
    # the stricter reference: a plain step whose forward has the DCR forward's batch (3B)
    plain_step3 = make_plain_step(torch.cat([x_i, x_j, x_i]), torch.cat([y_i, y_j, y_i]))

    t_plain3 = median_time(plain_step3, device, a.iters, a.warmup)
    t_dcr = median_time(dcr_step, device, a.iters, a.warmup)
    ips_plain = B / t_plain
    ips_plain3 = 3 * B / t_plain3
    ips_dcr = 6 * B / t_dcr
    mem = {"plain_step": peak_mib(plain_step, device), "dcr_step": peak_mib(dcr_step, device)}
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                dcr_step()
            _sync(device)
        key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
        Path(a.profile).write_text(prof.key_averages().table(sort_by=key, row_limit=40))

    # ---- 2. DII update vs inference over the same images
    n1.eval()
    n_strong = max(1, n_scan // 8)
    items = []
    for _ in range((n_scan + B - 1) // B):
        xb, yb = _synthetic_batch(B, C, a.size, torch.device("cpu"), gen)
        items += [{"image": xb[k], "mask": yb[k]} for k in range(B)]
    items = items[:n_scan]
    acc = SimpleNamespace(process_index=0, num_processes=1, device=device)
    strong, weak = list(range(n_strong)), list(range(n_strong, n_scan))

    def dii_update():
        ref = reference_grad(n1, items, strong, acc, scan_batch, autocast=autocast)
        weak_scores(n1, items, weak, ref, acc, scan_batch, autocast=autocast)

    from torch.utils.data import DataLoader

    @torch.no_grad()
    def inference():
        for batch in DataLoader(items, batch_size=scan_batch):
            with autocast():
                n1(batch["image"].to(device))

    t_inf = median_time(inference, device, max(3, a.iters // 2), 1)
    t_dii = median_time(dii_update, device, max(3, a.iters // 2), 1)
    mem["inference"] = peak_mib(inference, device)
    mem["dii_update"] = peak_mib(dii_update, device)
    dii_per_image = t_dii / n_scan

    # ---- 3. DII's share at the paper's settings
    t_step16 = t_dcr * a.paper_batch / B  # DCR step time scales ~linearly with the batch
    t_update = dii_per_image * (a.paper_weak + a.paper_strong)
    share = t_update / (t_update + a.paper_tau * t_step16)

    machine = a.machine or (torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)")
    res = {
        "machine": machine, "device": str(device), "backbone": a.backbone, "decoder_channels": F_, "size": a.size,
        "batch": B, "amp": a.amp, "channels_last": a.channels_last, "torch": torch.__version__,
        "plain_step_s": t_plain, "dcr_step_s": t_dcr,
        "plain_image_passes_per_s": ips_plain, "dcr_image_passes_per_s": ips_dcr, "dcr_vs_plain": ips_dcr / ips_plain,
        "plain3_step_s": t_plain3, "plain3_image_passes_per_s": ips_plain3, "dcr_vs_plain3": ips_dcr / ips_plain3,
        "scan_images": n_scan, "scan_batch": scan_batch, "inference_s": t_inf, "dii_update_s": t_dii,
        "dii_vs_inference": t_dii / t_inf,
        "paper_dii_update_s": t_update, "paper_tau_steps_s": a.paper_tau * t_step16, "paper_dii_share": share,
        "peak_mib": mem,
    }
    rows = [
        ("DCR step, image-passes/s", f"{ips_dcr:.1f}", f"plain B={B}: {ips_plain:.1f}", f"{100 * ips_dcr / ips_plain:.1f}%", ">= 90%"),
        ("  same, plain at the DCR forward batch", f"{ips_dcr:.1f}", f"plain B={3 * B}: {ips_plain3:.1f}",
         f"{100 * ips_dcr / ips_plain3:.1f}%", ">= 90%"),
        (f"DII update / inference ({n_scan} img)", f"{t_dii * 1e3:.1f} ms", f"{t_inf * 1e3:.1f} ms", f"{t_dii / t_inf:.2f}x", "<= 1.3x"),
        (f"DII share (tau {a.paper_tau}, {a.paper_weak} weak, B {a.paper_batch})", f"{t_update:.1f} s/update",
         f"{a.paper_tau * t_step16:.1f} s/{a.paper_tau} steps", f"{100 * share:.2f}%", "<= 10%"),
    ]
    print(f"machine: {machine}; {a.backbone} F={F_} {a.size}px batch {B} amp {a.amp}"
          + (" channels_last" if a.channels_last else ""))
    head = ("figure", "measured", "reference", "ratio", "target")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    for r in [head] + rows:
        print("  ".join(str(v).ljust(wd) for v, wd in zip(r, widths)))
    if gpu:
        print("peak GPU memory above the inputs (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
