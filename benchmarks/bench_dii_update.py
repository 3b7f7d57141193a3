"""One gamma update of the `cpu` suite's DII + DCR runs, with the images loaded at every update and with
``dii.scan_cache_mib`` (hybrid_accel.dii.ScanCache) keeping them in memory between updates.

    python benchmarks/bench_dii_update.py --out benchmarks/results/bench_dii_update_cpu.json

The suite's data and sizes: hybrid CVC-ClinicDB as the `cpu` preset prepares it (44 strong, 362 weak train
frames; from ``--source``, default ``../shared/data/cvc-clinicdb``, into a temporary folder unless
``--root`` names a prepared one), 96x128, EfficientNet-Lite0 DeepLabv3+ (decoder width 64, random weights:
the cost does not depend on them), the recommended DII (centred score per unit of area, both networks
scored, scan batch 64), one thread. Reported: the median seconds of ``--updates`` updates each way (the
cached one after a first update that fills the cache), the part spent loading images (the uncached
update's time minus the cached one's), and whether both give the same gamma.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_accel.data import HybridDataset  # noqa: E402
from hybrid_accel.dii import DIIUpdater, GammaState  # noqa: E402
from hybrid_accel.model import build_model  # noqa: E402
from hybrid_accel.reproduce import PRESETS, prepare_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None, help="a prepared hybrid dataset (default: prepare the cpu preset's)")
    p.add_argument("--source", default=None, help="CVC-ClinicDB folder (default: ../shared/data/cvc-clinicdb)")
    p.add_argument("--updates", type=int, default=3, help="timed updates each way")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file for the figures")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.root) if a.root else prepare_dataset(PRESETS["cpu"], Path(tmp) / "data", a.source)
        ds = HybridDataset(root, "train", image_size=(96, 128))
        nets = [build_model("tf_efficientnet_lite0", ds.num_classes, decoder_channels=64).eval() for _ in range(2)]
        cfg = SimpleNamespace(strong_batches=0, scan="all", scan_size=0, scan_batch_size=64, score="centred",
                              normalize="area")
        acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
        times, gammas, cached = {}, {}, 0
        for name, cache_bytes in (("loaded", 0), ("cached", 2048 * 2**20)):
            up = DIIUpdater(GammaState(ds.n_weak, init=0.5), ds, ds.strong_indices, ds.weak_indices, cfg, seed=0,
                            cache_bytes=cache_bytes)
            up.update(nets, acc, step=0)  # the cached one fills its cache here
            t = []
            for k in range(a.updates):
                t0 = time.perf_counter()
                up.update(nets, acc, step=k + 1)
                t.append(time.perf_counter() - t0)
            times[name], gammas[name] = t, up.gamma.gamma.clone()
            if cache_bytes:
                cached = up.dataset.nbytes
    med = {k: statistics.median(v) for k, v in times.items()}
    same = bool(torch.equal(gammas["loaded"], gammas["cached"]))
    print(f"one gamma update, two networks, {ds.n_strong} strong + {ds.n_weak} weak images at 96x128, {a.threads} "
          f"thread(s), median of {a.updates}: loaded every update {med['loaded']:.2f} s, cached {med['cached']:.2f} s "
          f"({med['loaded'] / med['cached']:.2f}x; loading {med['loaded'] - med['cached']:.2f} s); "
          f"cache {cached / 2**20:.0f} MiB; same gamma: {same}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(
            strong=ds.n_strong, weak=ds.n_weak, size=[96, 128], threads=a.threads, torch=torch.__version__,
            machine=platform.machine(), seconds=times, median_s=med, cache_mib=cached / 2**20, same_gamma=same),
            indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
