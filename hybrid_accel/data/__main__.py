"""``python -m hybrid_accel.data {synth,prepare,check}``: write, prepare and check datasets.

Exit status: 0 on success, 1 when the dataset has problems (listed on stderr, each naming its
file), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .build import make_synthetic_hybrid, prepare_hybrid
from .errors import DatasetError
from .validate import format_data_summary, validate_dataset


def _size(text: str) -> tuple[int, int]:
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            return int(h), int(w)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}") from None


def _add_weak_args(p: argparse.ArgumentParser, synth: bool = False) -> None:
    p.add_argument("--strong-fraction", type=float, default=0.1,
                   help="fraction of the train split kept with exact masks (default 0.1)")
    p.add_argument("--strong-count", type=int, default=None,
                   help="number of strong train images (overrides --strong-fraction)")
    p.add_argument("--weak", default="auto" if synth else "ellipse",
                   help="weak simulator or mixture: ellipse, box, scribble, or e.g. ellipse:0.6,box:0.2,scribble:0.2"
                        + (" ('none': every image strong; default auto: ellipse for polyp, scribble for asoct)"
                           if synth else " (default ellipse)"))
    p.add_argument("--severity", default="uniform:0,1",
                   help="per-image severity distribution: a number, uniform:a,b or beta:a,b (default uniform:0,1)")
    p.add_argument("--drop-fraction", type=float, default=None if synth else 0.4,
                   help="fraction of weak images whose foreground is dropped to background (paper: 0.4; "
                        + ("default 0.4 for polyp, 0 for asoct)" if synth else "default 0.4)"))
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: up to 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-check", action="store_true", help="skip validating the written dataset")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hybrid_accel.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic hybrid dataset (polyp-like or AS-OCT-like)",
                       description="Write a synthetic dataset with exact masks and simulated weak masks.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--kind", choices=("polyp", "asoct"), default="polyp", help="polyp (binary) or asoct (3 classes)")
    p.add_argument("--n-train", type=int, default=200, help="train images (default 200)")
    p.add_argument("--n-val", type=int, default=50, help="val images, all strong (default 50)")
    p.add_argument("--n-test", type=int, default=100, help="test images, all strong (default 100)")
    p.add_argument("--size", type=_size, default=(256, 256), help="image size, N or HxW (default 256)")
    p.add_argument("--image-format", choices=("jpg", "png"), default="jpg",
                   help="image file format: jpg (quality 95, fast to write and read; default) or png (lossless)")
    _add_weak_args(p, synth=True)

    p = sub.add_parser("prepare", help="hybrid dataset from a fully annotated folder",
                       description="Split a fully annotated folder by group, keep a few exact masks in train "
                                   "and simulate weak masks for the rest.")
    p.add_argument("source", help="folder with a CSV (image, mask[, group/sequence/patient]) or images/ + masks/")
    p.add_argument("--out", required=True, help="output folder (not inside the source)")
    p.add_argument("--csv", default=None, help="CSV listing the pairs (default: the one in the source)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of groups for val (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of groups for test (default 0.2)")
    p.add_argument("--strong-by", choices=("frame", "group"), default="frame",
                   help="strong images as single frames drawn at random (default), or as whole groups "
                        "(sequences, patients) drawn until they hold the strong count")
    p.add_argument("--mask-mapping", default="auto",
                   help="raw:class pairs such as 0:0,255:1, or threshold:T (raw >= T is class 1); 'auto' maps "
                        "0/255 masks to 0/1 and thresholds 0/255 masks saved as JPEG at 128 (default)")
    p.add_argument("--num-classes", type=int, default=None, help="class count (default: largest class + 1, at least 2)")
    p.add_argument("--class-names", default=None, help="comma-separated class names")
    p.add_argument("--copy-images", action="store_true", help="copy images into the output (default: reference them)")
    p.add_argument("--max-groups", type=int, default=None, help="use only the first N groups (quick runs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset in an existing --out folder (default: refuse a non-empty --out)")
    p.add_argument("--max-per-group", type=int, default=None, help="use only the first N images of each group")
    _add_weak_args(p)

    p = sub.add_parser("check", help="validate a dataset and print a summary",
                       description="Check every file of a dataset; print counts per split and kind, class "
                                   "frequencies, image sizes and weak-mask quality.")
    p.add_argument("root", help="dataset folder or manifest CSV")
    p.add_argument("--mask-mapping", default=None, help="override dataset.yaml's mask mapping (e.g. 0:0,255:1 or threshold:128)")
    p.add_argument("--num-classes", type=int, default=None, help="override dataset.yaml's class count")
    p.add_argument("--allow-no-strong", action="store_true", help="accept a train split without strong images")
    p.add_argument("--quick", action="store_true", help="read image headers only (masks are still read)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--workers", type=int, default=4, help="reader threads (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _check(root, args, **kw) -> dict:
    summary = validate_dataset(root, progress=not args.no_progress, **kw)
    print(json.dumps(summary, indent=1, default=str) if getattr(args, "json", False) else format_data_summary(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.command == "synth":
            path = make_synthetic_hybrid(
                args.out, kind=args.kind, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                size=args.size, strong_fraction=args.strong_fraction, strong_count=args.strong_count,
                weak=None if args.weak.lower() == "none" else args.weak, severity=args.severity,
                drop_fraction=args.drop_fraction, seed=args.seed, image_format=args.image_format,
                workers=args.workers, progress=not args.no_progress)
            print(f"wrote {path} in {time.perf_counter() - t0:.1f}s")
            if not args.no_check:
                _check(path, args, require_strong=False)
        elif args.command == "prepare":
            path = prepare_hybrid(
                args.source, args.out, csv_path=args.csv, strong_fraction=args.strong_fraction,
                strong_count=args.strong_count, strong_by=args.strong_by, val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                weak=args.weak, severity=args.severity, drop_fraction=args.drop_fraction, seed=args.seed,
                mask_mapping=args.mask_mapping, num_classes=args.num_classes,
                class_names=args.class_names.split(",") if args.class_names else None,
                copy_images=args.copy_images, max_groups=args.max_groups, max_per_group=args.max_per_group,
                workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite)
            print(f"wrote {path} in {time.perf_counter() - t0:.1f}s")
            if not args.no_check:
                _check(path, args)
        else:
            _check(args.root, args, mask_mapping=args.mask_mapping, num_classes=args.num_classes,
                   require_strong=not args.allow_no_strong, decode_images=not args.quick, workers=args.workers)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # bad option values (e.g. an unknown weak simulator)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
