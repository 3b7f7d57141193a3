"""Time Dice + ASSD for a test set of realistic binary masks (default 200 images of 512x512).

    python benchmarks/bench_metrics.py [--n 200] [--size 512] [--medpy 20] [--out results_metrics.md]

Masks are smooth blobs (rotated ellipses with a wavy outline, polyp-like); the prediction is the
truth distorted (shifted, rescaled, wavier). Reports the median of repeated runs of the whole
set through ``hybrid_accel.metrics.dice_assd``, and medpy 0.5.2 on a subset for reference.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from hybrid_accel.metrics import dice_assd


def blob(rng: np.random.Generator, size: int, centre=None, axes=None, angle=None) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = centre if centre is not None else rng.uniform(0.2 * size, 0.8 * size, 2)
    a, b = axes if axes is not None else rng.uniform(0.06 * size, 0.3 * size, 2)
    th = angle if angle is not None else rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / a
    v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / b
    wave = 1 + rng.uniform(0.02, 0.15) * np.sin(rng.integers(2, 7) * np.arctan2(v, u) + rng.uniform(0, 6))
    return u * u + v * v < wave * wave


def make_pairs(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
        a, b = rng.uniform(0.06 * size, 0.3 * size, 2)
        th = rng.uniform(0, np.pi)
        gt = blob(rng, size, (cy, cx), (a, b), th)
        shift = rng.normal(0, 0.03 * size, 2)
        scale = rng.uniform(0.8, 1.2, 2)
        pred = blob(rng, size, (cy + shift[0], cx + shift[1]), (a * scale[0], b * scale[1]), th + rng.normal(0, 0.2))
        pairs.append((pred.astype(np.uint8), gt.astype(np.uint8)))
    return pairs


def run(pairs):
    for pred, gt in pairs:
        dice_assd(pred, gt, num_classes=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--medpy", type=int, default=20, help="images timed with medpy (0 to skip)")
    p.add_argument("--machine", default="2-core CPU (dev machine)")
    p.add_argument("--out", default=None, help="write a markdown table here")
    args = p.parse_args()

    pairs = make_pairs(args.n, args.size)
    run(pairs[:5])  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run(pairs)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    rows = [("hybrid_accel.metrics.dice_assd", args.n, med, med / args.n * 1e3)]

    max_err = None
    if args.medpy:
        from medpy.metric.binary import assd, dc

        sub = pairs[: args.medpy]
        t = time.perf_counter()
        ref = [(dc(pr, g), assd(pr, g, connectivity=1)) for pr, g in sub]
        tm = time.perf_counter() - t
        rows.append((f"medpy 0.5.2 dc + assd (first {len(sub)} images)", len(sub), tm, tm / len(sub) * 1e3))
        ours = [dice_assd(pr, g, 2) for pr, g in sub]
        max_err = max(max(abs(o["dice"][0] - r[0]), abs(o["assd"][0] - r[1])) for o, r in zip(ours, ref))

    fg = np.mean([g.mean() for _, g in pairs])
    lines = [
        f"Dice + ASSD, {args.n} binary masks of {args.size}x{args.size} (foreground {fg:.1%} of pixels on "
        f"average), median of {args.repeats} runs; machine: {args.machine} "
        f"({platform.processor() or platform.machine()}, Python {platform.python_version()}).",
        "",
        "| implementation | images | seconds | ms / image |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {n} | {s:.3f} | {ms:.2f} |" for name, n, s, ms in rows]
    if max_err is not None:
        lines += ["", f"Largest difference from medpy on those images (Dice or ASSD): {max_err:.2e}."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text("# Metric benchmark\n\n" + text + "\n")


if __name__ == "__main__":
    main()
