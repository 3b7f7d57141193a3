"""Reproduce the paper's tables with our own runs: every baseline and ablation, several seeds.

    python benchmarks/run_suite.py --preset cpu                  # hybrid CVC-ClinicDB, this 2-core machine
    python benchmarks/run_suite.py --preset cpu-quick            # the same at 500 steps (under-trained)
    python benchmarks/run_suite.py --preset gpu --out runs/repro-gpu   # hybrid CVC-ClinicDB on one H100
    python benchmarks/run_suite.py --preset cpu --seeds 0 1 2 --methods full naive-hybrid few-strong
    python benchmarks/run_suite.py --preset cpu --report         # tables from the runs that finished
    python benchmarks/run_suite.py --preset cpu --methods full -- train.steps=800   # trainer overrides after --

Methods (DESIGN.md section 4): weakly-supervised, few-strong, fully-supervised, naive-hybrid,
dii-only, dcr-only, dii-dcr, full (= DII + DCR + DII sampling). Each run is
``python -m hybrid_accel.train`` with the preset's overrides and tracking off; see docs/reproduce.md.

Writes under ``--out``: ``data/`` (the dataset), ``runs/<method>-s<seed>/`` (trainer outputs),
``logs/``, ``results.json``, ``runs.csv``, ``summary.md`` (the tables), ``gamma_hist.png`` (Fig. 3b)
and ``curves.png`` (Fig. 3c). Finished runs are kept and skipped when the command is run again; an
unfinished run with the same settings continues from its latest checkpoint.
Exit status 0 (also when a target is missed: the tables say so), 1 when a run failed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_accel.reproduce import BY_KEY, PRESETS, report, run_suite  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/run_suite.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Presets:\n" + "\n".join(f"  {k}: {v.description}" for k, v in PRESETS.items()))
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the preset's)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(BY_KEY), help="default: all eight")
    p.add_argument("--out", default=None, help="output folder (default: runs/reproduce-<preset>)")
    p.add_argument("--jobs", type=int, default=None, help="runs at once (default: the preset's)")
    p.add_argument("--source", default=None, help="gpu preset: the CVC-ClinicDB folder "
                                                  "(default: ../shared/data/cvc-clinicdb beside the repository)")
    p.add_argument("--pretrained", default=None,
                   help="backbone weights (a local file, or 'timm' on a machine online); default: from scratch")
    p.add_argument("--report", action="store_true", help="only rebuild the tables from the finished runs")
    p.add_argument("--inprocess", action="store_true", help="train in this process, one run at a time")
    p.add_argument("overrides", nargs="*", help="extra trainer overrides for every run (key=value, e.g. train.steps=20); "
                                                "after -- when they follow --methods or --seeds")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    out = Path(a.out or f"runs/reproduce-{a.preset}")
    extra = list(a.overrides) + ([f"model.pretrained={a.pretrained}"] if a.pretrained else [])
    command = "python benchmarks/run_suite.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None
                                                                                       else sys.argv[1:]))
    runs = None
    if not a.report:
        runs = run_suite(preset, out, a.methods, a.seeds, a.jobs, a.inprocess, a.source, extra,
                         say=lambda m: print(m, flush=True))
    res = report(out, preset, command, runs, a.methods, a.seeds)
    print()
    print(res["tables"], end="")
    print(f"\nwritten: {out / 'summary.md'}, results.json, runs.csv, gamma_hist.png, curves.png")
    failed = [r for r in runs or [] if r["status"].startswith("failed")]
    for r in failed:
        print(f"FAILED: {r['method']} seed {r['seed']}: {r['status']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
