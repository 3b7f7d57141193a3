"""Microbenchmarks of the two fused ops against their PyTorch twins and the per-sample-gradient baselines.

    python benchmarks/bench_ops.py                    # sizes for the device found (cuda if present)
    python benchmarks/bench_ops.py --device cpu --preset cpu --out results.json

dii_scores (``hybrid_accel.dii``, built on grad_dot) is the same computation end to end, from the features,
logits and labels of one forward pass (full-resolution cross-entropy gradient pulled back through the bilinear
upsampling included), where the vmap and loop baselines differentiate each instance's real loss.

grad_dot is measured at the classifier stage it replaces: given the classifier's input features
``h`` [B, F, P] and the logit gradients ``delta`` [B, C, P] of one backward pass, compute
``s_k = <grad_theta' l_k, g_ref>`` for every instance k by
  ext    the compiled op (one pass over h and delta, no per-sample gradients),
  twin   the pure-PyTorch twin (batched matmul to the C x F per-sample gradients, then a dot),
  vmap   torch.func.vmap(grad) of the surrogate loss <delta_k, W h_k + b> per instance (per-sample gradients
         materialised, how the authors' public code does it), then a dot with g_ref,
  loop   one autograd call per instance (same surrogate), then a dot.
The surrogate has exactly the per-instance classifier gradient of the real loss, since delta_k = dl_k/dz_k.

Reported per case: median time (torch.utils.benchmark), peak extra memory (CUDA: max_memory_allocated above
the inputs; CPU: peak resident memory above the memory before the call, sampled by a thread), the minimum bytes the computation must move, the
achieved bandwidth and its fraction of the device's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch
import torch.utils.benchmark as tbench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hybrid_accel import ops  # noqa: E402
from hybrid_accel.dcr import choose_paste_class  # noqa: E402
from hybrid_accel.dii import dii_scores  # noqa: E402

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, min_run_time):
    fn()
    sync(device)
    m = tbench.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return m.median


def copy_bandwidth(device, min_run_time):
    """Device copy bandwidth in bytes/s, counting bytes read and written."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)  # 1 GiB / 256 MiB of float32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, min_run_time)
    del src, dst
    return 2 * n * 4 / t


# -------------------------------------------------------------------------------------------- grad_dot
def grad_dot_inputs(B, F, C, P, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # generated in their own dtype: a float32 temporary would raise the CPU peak-RSS baseline
    h = torch.randn(B, F, P, generator=g, dtype=dtype).to(device)
    delta = torch.randn(B, C, P, generator=g, dtype=dtype).mul_(1e-3).to(device)
    W = torch.randn(C, F, generator=g).to(device)
    b = torch.randn(C, generator=g).to(device)
    return h, delta, W, b


def grad_dot_variant(name, h, delta, W, b):
    if name in ("ext", "twin"):
        backend = "ext" if name == "ext" else "torch"
        return lambda: ops.grad_dot(h, delta, W, b, backend=backend)
    B, F, P = h.shape
    C = delta.shape[1]
    w0 = torch.zeros(C, F, device=h.device, dtype=h.dtype)
    b0 = torch.zeros(C, device=h.device, dtype=h.dtype)

    def surrogate(w, bias, hk, dk):  # <delta_k, W h_k + b>: its gradient is instance k's classifier gradient
        z = w @ hk + bias.unsqueeze(1)
        return (dk * z).float().sum()

    if name == "vmap":
        per_sample = torch.func.vmap(torch.func.grad(surrogate, argnums=(0, 1)), in_dims=(None, None, 0, 0))

        def run():
            gw, gb = per_sample(w0, b0, h, delta)  # [B, C, F], [B, C]: materialised per-sample gradients
            return (gw.float() * W).sum((1, 2)) + (gb.float() * b).sum(1)

        return run
    if name == "loop":
        w = w0.clone().requires_grad_(True)
        bias = b0.clone().requires_grad_(True)

        def run():
            out = []
            for k in range(B):
                gw, gb = torch.autograd.grad(surrogate(w, bias, h[k], delta[k]), (w, bias))
                out.append((gw.float() * W).sum() + (gb.float() * b).sum())
            return torch.stack(out)

        return run
    raise ValueError(name)


def dii_inputs(B, F, C, h, dtype, device, seed=0):
    """Classifier features/logits at h x h and labels at 4h x 4h with 10% ignored pixels."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    feats = torch.randn(B, F, h, h, generator=g, dtype=dtype).to(device)
    W = (torch.randn(C, F, generator=g) * F ** -0.5).to(device)
    b = torch.zeros(C, device=device)
    logits = torch.nn.functional.conv2d(feats, W[:, :, None, None].to(dtype), b.to(dtype))
    labels = torch.randint(0, C, (B, 4 * h, 4 * h), generator=g)
    labels[torch.rand(B, 4 * h, 4 * h, generator=g) < 0.1] = 255
    ref_w = torch.randn(C, F, generator=g).to(device)
    ref_b = torch.randn(C, generator=g).to(device)
    return feats, logits, labels.to(device), W, b, ref_w, ref_b


def dii_variant(name, feats, logits, labels, W, b, ref_w, ref_b):
    """End to end, from one forward pass's features, logits and the labels to the scores s_k."""
    if name in ("ext", "twin"):
        backend = "ext" if name == "ext" else "torch"
        return lambda: dii_scores(feats, logits, labels, ref_w, ref_b, backend=backend)
    from hybrid_accel.losses import per_instance_ce

    size = tuple(labels.shape[-2:])

    def loss(w, bias, hk, yk):  # instance k's real loss as a function of the classifier's parameters
        z = torch.nn.functional.conv2d(hk.unsqueeze(0).float(), w[:, :, None, None], bias)
        up = torch.nn.functional.interpolate(z, size=size, mode="bilinear", align_corners=False)
        return per_instance_ce(up, yk.unsqueeze(0)).sum()

    if name == "vmap":
        per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))

        def run():
            gw, gb = per_sample(W, b, feats, labels)  # materialised per-sample gradients [B, C, F], [B, C]
            return (gw * ref_w).sum((1, 2)) + (gb * ref_b).sum(1)

        return run
    if name == "loop":
        w = W.clone().requires_grad_(True)
        bias = b.clone().requires_grad_(True)

        def run():
            out = []
            for k in range(feats.shape[0]):
                gw, gb = torch.autograd.grad(loss(w, bias, feats[k], labels[k]), (w, bias))
                out.append((gw * ref_w).sum() + (gb * ref_b).sum())
            return torch.stack(out)

        return run
    raise ValueError(name)


def grad_dot_bytes(B, F, C, P, dtype):
    es = torch.empty(0, dtype=dtype).element_size()
    return B * F * P * es + B * C * P * es


# ------------------------------------------------------------------------------------ foreground_paste
def paste_inputs(B, K, C, H, W, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x_i = torch.randn(B, K, H, W, generator=g, dtype=dtype).to(device)
    x_j = torch.randn(B, K, H, W, generator=g, dtype=dtype).to(device)
    # blob-like label maps: about a quarter of each image is foreground
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    cy = torch.rand(B, 1, 1, generator=g) * H
    cx = torch.rand(B, 1, 1, generator=g) * W
    y = (((yy - cy) ** 2 + (xx - cx) ** 2) < (0.28 * min(H, W)) ** 2).long() * torch.randint(1, C, (B, 1, 1), generator=g)
    y = y.to(device)
    preds = [torch.randn(B, C, H, W, generator=g, dtype=dtype).to(device) for _ in range(4)]
    cls = choose_paste_class(y, C, generator=torch.Generator(device="cpu").manual_seed(seed))
    return (x_i, x_j, y, cls, *preds)


def paste_bytes(B, K, C, H, W, dtype):
    es = torch.empty(0, dtype=dtype).element_size()
    px = B * H * W
    # labels (int64), one source image, one source prediction per network; x_m, mask, two int64 label maps
    return px * (8 + K * es + 2 * C * es) + px * (K * es + 1 + 16)


# ----------------------------------------------------------------------------------------------- cases
def cases(preset):
    if preset == "gpu":
        gd = [(B, 256, C, (H // 4) ** 2, d) for B in (16, 64) for C in (2, 3) for H in (256, 512) for d in ("bf16", "fp32")]
        fp = [(B, 3, C, H, H, d) for B in (16, 64) for C in (2, 3) for H in (256, 512) for d in ("bf16", "fp32")]
        dii = [(64, 256, 2, 128, "bf16"), (64, 256, 2, 128, "fp32"), (16, 256, 2, 128, "bf16")]
        return gd, fp, dii
    if preset == "cpu":
        gd = [(16, 256, C, (H // 4) ** 2, d) for C in (2, 3) for H in (256, 512) for d in ("fp32", "bf16")]
        fp = [(16, 3, C, 256, 256, d) for C in (2, 3) for d in ("fp32", "bf16")]
        dii = [(16, 256, 2, 64, "fp32")]
        return gd, fp, dii
    if preset == "smoke":
        return [(4, 32, 2, 64, "fp32")], [(2, 3, 2, 16, 16, "fp32")], [(4, 16, 2, 8, "fp32")]
    raise ValueError(preset)


def measure_one(kind, case, variant, device, min_run_time):
    """Time and peak memory of one variant on one case (in this process)."""
    dtype = DT[case[-1]]
    if kind == "grad_dot":
        B, F, C, P, _ = case
        inputs = grad_dot_inputs(B, F, C, P, dtype, device)
        fn = grad_dot_variant(variant, *inputs)
        nbytes = grad_dot_bytes(B, F, C, P, dtype)
    elif kind == "dii_scores":
        B, F, C, h, _ = case
        inputs = dii_inputs(B, F, C, h, dtype, device)
        fn = dii_variant(variant, *inputs)
        es = torch.empty(0, dtype=dtype).element_size()
        nbytes = B * (F + C) * h * h * es + B * 16 * h * h * 8  # features, logits, int64 labels
    else:
        B, K, C, H, W, _ = case
        inputs = paste_inputs(B, K, C, H, W, dtype, device)
        backend = "ext" if variant == "ext" else "torch"
        fn = lambda: ops.foreground_paste(*inputs, backend=backend)  # noqa: E731
        nbytes = paste_bytes(B, K, C, H, W, dtype)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = cpu_peak_bytes(fn)
    t = median_time(fn, device, min_run_time)
    return {"time_s": t, "peak_bytes": peak, "bytes": nbytes}


def cpu_peak_bytes(fn, interval=2e-4):
    """Peak resident memory of one call of ``fn`` above the resident memory just before it.

    A thread samples /proc/self/statm while ``fn`` runs; large tensors are mmap'd and returned to the
    system when freed, so the memory before the call holds only what is alive then.
    """
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base = rss()
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(interval)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    peak[0] = max(peak[0], rss())
    return max(0, peak[0] - base)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=["cpu", "gpu", "smoke"], default=None)
    ap.add_argument("--variants", default="ext,twin,vmap,loop", help="grad_dot variants to run")
    ap.add_argument("--min-run-time", type=float, default=None, help="seconds per timing (default 0.5 GPU, 1.0 CPU)")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    mrt = args.min_run_time or (0.5 if device.type == "cuda" else 1.0)
    gd_cases, fp_cases, dii_cases = cases(preset)
    variants = [v for v in args.variants.split(",") if v]
    if not ops.extension_available():
        print(f"note: compiled extension not available ({ops.EXT_ERROR}); 'ext' rows are skipped")
        variants = [v for v in variants if v != "ext"]
    bw = copy_bandwidth(device, mrt)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    info = {
        "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d"), "copy_bandwidth_GBps": bw / 1e9, "preset": preset,
    }
    if device.type == "cuda":
        info["driver"] = _driver_version()
    print(f"# {name}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.1f} GB/s (read+write)")
    rows = []
    hdr = f"{'op':<16}{'case':<34}{'variant':<8}{'median ms':>11}{'peak MiB':>10}{'GB/s':>9}{'%roof':>7}{'speedup':>9}"
    print(hdr)
    print("-" * len(hdr))
    paste_variants = [v for v in ("ext", "twin") if v in variants]
    for kind, case_list, vlist in (("grad_dot", gd_cases, variants), ("dii_scores", dii_cases, variants),
                                   ("foreground_paste", fp_cases, paste_variants)):
        for case in case_list:
            res = {}
            for v in vlist:
                if v == "loop" and case[0] > 16 and device.type == "cpu":
                    continue
                try:
                    res[v] = measure_one(kind, case, v, device, mrt)
                except Exception as exc:  # noqa: BLE001 - report and go on (for example out of memory)
                    print(f"{kind:<16}{str(case):<34}{v:<8} failed: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
            ref_t = res.get("ext", res.get("twin", {})).get("time_s")
            for v, r in res.items():
                gbps = r["bytes"] / r["time_s"] / 1e9
                frac = r["bytes"] / r["time_s"] / bw
                speed = r["time_s"] / ref_t if ref_t else float("nan")
                row = dict(op=kind, case=list(case), variant=v, **r, GBps=gbps, roofline_frac=frac, ext_speedup=speed)
                rows.append(row)
                print(f"{kind:<16}{str(case):<34}{v:<8}{r['time_s'] * 1e3:>11.3f}{r['peak_bytes'] / 2**20:>10.1f}"
                      f"{gbps:>9.1f}{100 * frac:>6.0f}%{speed:>8.1f}x")
    print("case: grad_dot (B, F, C, P, dtype); dii_scores (B, F, C, h, dtype), labels at 4h x 4h, end to end "
          "from features + logits + labels; foreground_paste (B, K, C, H, W, dtype). "
          "speedup = variant time / ext time (how many times faster the compiled op is).")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    return rows


def _driver_version():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


if __name__ == "__main__":
    main()
