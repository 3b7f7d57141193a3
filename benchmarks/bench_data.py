"""Training-loader throughput: images/s of HybridDataset + DataLoader at 256x256, augment on.

For each worker count the loader is built afresh, started (startup timed separately: worker
processes fork and import), then timed over a fixed number of batches; the median of the
repeats is reported. CPU-only work, so wall-clock timing with ``perf_counter`` is right here
(no asynchronous device work to synchronise).

Also reports the per-image cost at 0 workers split into decode (file -> array) and transform
(warp, flips, jitter, normalise), which is what one worker sustains.

    python benchmarks/bench_data.py                     # synthetic polyps (+ CVC-ClinicDB if present)
    python benchmarks/bench_data.py --write /tmp/results_data.md --machine "2-core CPU (dev machine)"
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from hybrid_accel.data import HybridDataset, make_synthetic_hybrid, prepare_hybrid
from hybrid_accel.data.manifest import read_image, read_mask
from hybrid_accel.data.transforms import AugmentConfig, transform_pair

CVC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cvc-clinicdb"


def loader_rate(ds, workers: int, batch: int, batches: int, repeats: int) -> tuple[float, float]:
    """(median images/s over ``repeats`` timed runs of ``batches`` batches, startup seconds)."""
    if (batches + workers) * batch > len(ds):
        raise SystemExit(f"{len(ds)} images are too few for {batches} timed batches of {batch} with {workers} workers")
    rates, startups = [], []
    for r in range(repeats):
        dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=False, generator=torch.Generator().manual_seed(r))
        t0 = time.perf_counter()
        it = iter(dl)
        next(it)  # workers started, first batch ready
        # Let every worker get through its first prefetched batches before timing.
        for _ in range(max(0, workers - 1)):
            next(it)
        t1 = time.perf_counter()
        n = 0
        for _ in range(batches):
            b = next(it)
            n += b["image"].shape[0]
        t2 = time.perf_counter()
        del it, dl
        rates.append(n / (t2 - t1))
        startups.append(t1 - t0)
    return statistics.median(rates), statistics.median(startups)


def breakdown(ds, n: int = 64) -> tuple[float, float]:
    """Median ms per image of decoding (image + mask) and of the augmenting transform."""
    dec, tr = [], []
    rng = np.random.default_rng(0)
    cfg = AugmentConfig()
    for i in range(min(n, len(ds))):
        t0 = time.perf_counter()
        img, mask = read_image(ds.image_paths[i]), read_mask(ds.mask_path(i), ds.mask_mapping)
        t1 = time.perf_counter()
        transform_pair(img, mask, ds.image_size, rng, cfg, ds.ignore_index)
        t2 = time.perf_counter()
        dec.append(t1 - t0)
        tr.append(t2 - t1)
    return statistics.median(dec) * 1e3, statistics.median(tr) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="worker counts (default 0 2 4)")
    ap.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    ap.add_argument("--size", type=int, default=256, help="output size (default 256)")
    ap.add_argument("--n-images", type=int, default=640, help="synthetic train images (default 640)")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per run (default 20)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per setting; median reported (default 5)")
    ap.add_argument("--no-cvc", action="store_true", help="skip CVC-ClinicDB even where present")
    ap.add_argument("--machine", default="2-core CPU (dev machine)", help="machine description for the table")
    ap.add_argument("--write", default=None, help="write the results section (markdown) to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the loader's work is per-sample numpy/PIL; keep torch out of the way

    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    datasets = []
    synth = make_synthetic_hybrid(Path(tmp.name) / "synth", n_train=args.n_images, n_val=0, n_test=0,
                                  size=args.size, seed=0)
    datasets.append((f"synthetic polyp {args.size}x{args.size} JPEG", synth))
    if CVC.exists() and not args.no_cvc:
        cvc = prepare_hybrid(CVC, Path(tmp.name) / "cvc", val_fraction=0.1, test_fraction=0.1, seed=0)
        datasets.append(("CVC-ClinicDB 384x288 JPEG", cvc))

    cpu = os.cpu_count()
    load0 = os.getloadavg()[0]
    rows = []
    print(f"machine: {args.machine} (os.cpu_count()={cpu}), batch {args.batch}, output {args.size}x{args.size}, "
          f"augment on, torch {torch.__version__}")
    header = f"{'dataset':<30} {'workers':>7} {'images/s':>9} {'startup s':>9}"
    print(header)
    for name, path in datasets:
        ds = HybridDataset(path, split="train", image_size=args.size, augment=True)
        dec, tr = breakdown(ds)
        for w in args.workers:
            rate, start = loader_rate(ds, w, args.batch, args.batches, args.repeats)
            rows.append((name, w, rate, start, dec, tr))
            print(f"{name:<30} {w:>7} {rate:>9.0f} {start:>9.2f}")
        print(f"{name:<30} per image at 0 workers: decode {dec:.2f} ms, transform {tr:.2f} ms")

    load1 = os.getloadavg()[0]
    print(f"1-minute load average: {load0:.1f} before, {load1:.1f} after")
    if args.write:
        lines = [
            "## Data loading (benchmarks/bench_data.py)",
            "",
            f"Machine: {args.machine} (os.cpu_count() = {cpu}); torch {torch.__version__}. "
            f"HybridDataset train split, augment on (zoom, rotation, shift, flips, colour jitter), "
            f"output {args.size}x{args.size}, batch {args.batch}, shuffle; median of {args.repeats} runs of "
            f"{args.batches} batches after startup. 1-minute load average {load0:.1f} before and {load1:.1f} "
            f"after (other jobs share the machine: more workers than free cores cannot help).",
            "",
            "| dataset | workers | images/s | startup (s) |",
            "|---|---:|---:|---:|",
        ]
        for name, w, rate, start, _, _ in rows:
            lines.append(f"| {name} | {w} | {rate:.0f} | {start:.2f} |")
        lines += ["", "Per image at 0 workers (what one worker sustains):", ""]
        seen = set()
        for name, _, _, _, dec, tr in rows:
            if name not in seen:
                seen.add(name)
                lines.append(f"- {name}: decode {dec:.2f} ms + transform {tr:.2f} ms "
                             f"= about {1e3 / (dec + tr):.0f} images/s per worker")
        Path(args.write).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.write}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
