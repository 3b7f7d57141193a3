"""Writing datasets: synthetic ones, and hybrid ones prepared from a fully annotated folder.

Both write the same layout (see :mod:`hybrid_accel.data.manifest`)::

    out/manifest.csv    one row per image
    out/dataset.yaml    num_classes, ignore_index, mask_mapping, class names, how it was made
    out/images/         synthetic images (prepared datasets reference the source images by
                        absolute path unless asked to copy them)
    out/masks/          exact masks as class indices (the training mask of strong rows and the
                        true mask of every row)
    out/weak/           simulated weak masks (the training mask of weak rows)

Everything is deterministic from the seed: which images are strong, which weak simulator and
severity each weak image gets (:class:`~hybrid_accel.data.weak.WeakSpec`), and the random
draws of every simulation (``default_rng([seed, 3, i])`` for image ``i``).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .errors import DatasetError
from .manifest import (
    MAX_MASK_VALUES,
    apply_mask_mapping,
    looks_lossy_binary,
    threshold_mapping,
    too_many_values_message,
    mask_array,
    parse_mask_mapping,
    write_manifest,
    write_mask,
    write_meta,
)
from .synthetic import KINDS as SYNTH_KINDS
from .synthetic import FAINT, synthetic_sample
from .weak import WeakSpec, simulate, weak_quality

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GROUP_COLUMNS = ("group", "sequence", "patient", "video", "case")
WEAK_DEFAULTS = {"polyp": ("ellipse", 0.4), "asoct": ("scribble", 0.0)}  # kind -> (weak, drop_fraction)


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _n_strong(n_train: int, strong_fraction: float | None, strong_count: int | None) -> int:
    if strong_count is not None:
        if not 0 <= strong_count <= n_train:
            raise ValueError(f"strong_count={strong_count} must lie in 0..{n_train} (the train split's size)")
        return int(strong_count)
    frac = 0.1 if strong_fraction is None else float(strong_fraction)
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"strong_fraction must lie in [0, 1], got {frac}")
    return min(n_train, max(1 if frac > 0 and n_train else 0, int(round(frac * n_train))))


def _assign_kinds(
    n_train: int, strong_fraction, strong_count, weak: WeakSpec | None, seed: int,
    groups: Sequence[str] | None = None,
) -> list[tuple[str, str, float]]:
    """(kind, weak simulator, severity) for each train image, in order.

    Without ``groups`` the strong images are single frames drawn at random; with ``groups`` (one
    per train image) they are whole groups, drawn at random until they hold at least the strong
    count (see :func:`_strong_groups`)."""
    if weak is None:
        return [("strong", "", math.nan)] * n_train
    n_strong = _n_strong(n_train, strong_fraction, strong_count)
    strong = np.zeros(n_train, dtype=bool)
    if groups is None:
        order = np.random.default_rng([seed, 1]).permutation(n_train)
        strong[order[:n_strong]] = True
    else:
        chosen = _strong_groups(groups, n_strong, seed)
        strong[[i for i, g in enumerate(groups) if g in chosen]] = True
    # whole groups can overshoot the strong count: plan exactly the weak images there are
    plan = iter(weak.plan(n_train - int(strong.sum()), np.random.default_rng([seed, 2])))
    return [("strong", "", math.nan) if s else ("weak", *next(plan)) for s in strong]


def _strong_groups(groups: Sequence[str], n_strong: int, seed: int) -> set[str]:
    """Whole groups, in an order shuffled by ``seed``, taken until they hold ``n_strong`` images or more.

    Frames of one video (or slices of one patient) are near copies of each other: strong frames
    drawn one by one cover nearly every train group (41 random frames of hybrid CVC-ClinicDB's
    train split touch 17 of its 20 sequences), so the few strong images already show almost every
    polyp and the weak masks add next to nothing. Annotating a few whole groups exactly is also
    how a clinical team spends its budget."""
    if n_strong <= 0:
        return set()
    uniq = sorted(set(groups), key=lambda g: (len(g), g))
    size = {g: 0 for g in uniq}
    for g in groups:
        size[g] += 1
    chosen: set[str] = set()
    total = 0
    for k in np.random.default_rng([seed, 5]).permutation(len(uniq)):
        if total >= n_strong:
            break
        chosen.add(uniq[k])
        total += size[uniq[k]]
    return chosen


STRONG_BY = ("frame", "group")


def _weak_files(
    exact: np.ndarray, weak_type: str, severity: float, seed: int, index: int, ignore_index: int, weak_path: Path
) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 3, index])
    weak = simulate(exact, weak_type, severity, rng, ignore_index)
    write_mask(weak_path, weak)
    iou, dice = weak_quality(weak, exact, ignore_index)
    return {"quality_iou": iou, "quality_dice": dice, "weak_type": weak_type, "severity": severity}


def _manifest_row(
    root: Path, name: str, image: Any, exact: np.ndarray, split: str, row_kind: str, group: str,
    weak_type: str, severity: float, seed: int, index: int, ignore_index: int,
) -> dict[str, Any]:
    """Write the exact mask (and, for a weak row, the simulated weak mask) and return the manifest row."""
    mask_path = root / "masks" / f"{name}.png"
    write_mask(mask_path, exact)
    rec = {"image": image, "mask": mask_path, "split": split, "kind": row_kind, "group": group,
           "true_mask": mask_path, "weak_type": "", "severity": math.nan,
           "quality_iou": math.nan, "quality_dice": math.nan}
    if row_kind == "weak":
        weak_path = root / "weak" / f"{name}.png"
        rec.update(_weak_files(exact, weak_type, severity, seed, index, ignore_index, weak_path))
        rec["mask"] = weak_path
    return rec


def _pool_map(fn, jobs: list, workers: int | None, progress: bool, desc: str) -> list:
    """``[fn(*job) for job in jobs]`` in order, over a process pool when ``workers`` > 1."""
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, unit="img")
    out = []
    if workers <= 1 or len(jobs) < 16:
        for job in jobs:
            out.append(fn(*job))
            bar.update()
    else:
        with ProcessPoolExecutor(workers) as ex:
            for r in ex.map(fn, *zip(*jobs), chunksize=8):
                out.append(r)
                bar.update()
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------
# Synthetic datasets


def _synth_one(
    kind: str, seed: int, index: int, size: tuple[int, int], root: str, split: str, row_kind: str,
    weak_type: str, severity: float, ignore_index: int, image_ext: str, faint: float = FAINT,
) -> dict[str, Any]:
    img, exact = synthetic_sample(kind, seed, index, size, faint)
    name = f"{index:06d}"
    rootp = Path(root)
    image_path = rootp / "images" / f"{name}{image_ext}"
    if image_ext == ".png":
        Image.fromarray(img).save(image_path, compress_level=1)
    else:
        Image.fromarray(img).save(image_path, quality=95)
    return _manifest_row(rootp, name, image_path, exact, split, row_kind, name, weak_type, severity, seed, index,
                         ignore_index)


def make_synthetic_hybrid(
    root: str | os.PathLike,
    kind: str = "polyp",
    n_train: int = 200,
    n_val: int = 50,
    n_test: int = 100,
    size: int | Sequence[int] = 256,
    strong_fraction: float | None = 0.1,
    strong_count: int | None = None,
    weak: str | dict | None = "auto",
    severity: str | float = "uniform:0,1",
    drop_fraction: float | None = None,
    seed: int = 0,
    ignore_index: int = 255,
    image_format: str = "jpg",
    workers: int | None = None,
    progress: bool = False,
    faint: float = FAINT,
) -> Path:
    """Write a ready hybrid synthetic dataset to ``root``; return the manifest's path.

    Train images are strong (``strong_count``, or ``strong_fraction`` of the train split, at
    least one) or weak (mask simulated with the ``weak`` mixture at per-image ``severity``,
    ``drop_fraction`` of them dropped to background); val and test images are strong. Every row
    records its exact mask as ``true_mask``; weak rows also record the weak mask's true IoU and
    Dice. ``weak=None`` makes every image strong (a fully annotated dataset). Image ``i`` is the
    same whatever the counts, so datasets of different sizes from one seed are nested. ``faint``:
    share of barely visible polyps (:func:`hybrid_accel.data.synthetic.polyp_sample`).

    Defaults that depend on ``kind`` (:data:`WEAK_DEFAULTS`): ``weak="auto"`` is ``ellipse``
    for polyps and ``scribble`` for AS-OCT (an ellipse or box around a curved corneal band is
    mostly wrong even at severity 0); ``drop_fraction=None`` is 0.4 for polyps (the paper) and 0
    for AS-OCT.
    """
    if kind not in SYNTH_KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; choose from {', '.join(SYNTH_KINDS)}")
    if weak == "auto":
        weak = WEAK_DEFAULTS[kind][0]
    if drop_fraction is None:
        drop_fraction = WEAK_DEFAULTS[kind][1]
    size = _size2(size)
    root = Path(root)
    for sub in ("images", "masks", "weak"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    spec = None if weak in (None, "none") else WeakSpec(weak, severity, drop_fraction)
    train_plan = _assign_kinds(n_train, strong_fraction, strong_count, spec, seed)
    ext = "." + image_format.lower().lstrip(".").replace("jpeg", "jpg")
    if ext not in (".png", ".jpg"):
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    jobs = []
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    for i, split in enumerate(splits):
        row_kind, wt, sev = train_plan[i] if split == "train" else ("strong", "", math.nan)
        jobs.append((kind, seed, i, size, str(root), split, row_kind, wt, sev, ignore_index, ext, faint))
    records = _pool_map(_synth_one, jobs, workers, progress, f"synth {kind}")
    meta = {
        "name": f"synthetic-{kind}",
        "num_classes": len(SYNTH_KINDS[kind]),
        "class_names": list(SYNTH_KINDS[kind]),
        "ignore_index": ignore_index,
        "mask_mapping": None,
        "source": {"synthetic": kind, "seed": seed, "size": list(size), "n_train": n_train, "n_val": n_val,
                   "n_test": n_test, "strong": sum(r["kind"] == "strong" for r in records if r["split"] == "train"),
                   "weak": None if spec is None else str(weak), "severity": str(severity),
                   "drop_fraction": drop_fraction, **({"faint": faint} if kind == "polyp" else {})},
    }
    write_meta(root, meta)
    return write_manifest(root, records)


def make_synthetic_dataset(
    root: str | os.PathLike,
    kind: str = "polyp",
    n: int = 100,
    size: int | Sequence[int] = 256,
    seed: int = 0,
    splits: Sequence[float] = (0.7, 0.1, 0.2),
    strong_fraction: float | None = 0.1,
    strong_count: int | None = None,
    weak: str | dict | None = "auto",
    **kwargs,
) -> Path:
    """:func:`make_synthetic_hybrid` with ``n`` images divided by ``splits`` (train, val, test)."""
    if len(splits) != 3 or any(f < 0 for f in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test), got {splits}")
    tot = float(sum(splits))
    n_val = int(round(n * splits[1] / tot))
    n_test = int(round(n * splits[2] / tot))
    n_train = n - n_val - n_test
    return make_synthetic_hybrid(root, kind, n_train, n_val, n_test, size, strong_fraction=strong_fraction,
                                 strong_count=strong_count, weak=weak, seed=seed, **kwargs)


def synthetic_root(data: Any) -> Path:
    """Where the trainer's synthetic dataset for a config's ``data`` section lives.

    ``data.synthetic_dir`` when set, else ``$HYBRID_ACCEL_CACHE`` (default ``~/.cache/hybrid_accel``)
    ``/synth-<kind>-<hash>``, the hash naming the generator's settings (so a changed setting gets its
    own folder). Used by the trainer, which writes the dataset there, and by the audit, which reads it.
    """
    from ..sampling import derive_seed

    d = data
    key = (d.synthetic_kind, d.synthetic_n_train, d.synthetic_n_val, d.synthetic_n_test, d.synthetic_size,
           d.synthetic_strong, d.synthetic_seed, 1)
    if d.synthetic_kind == "polyp" and d.synthetic_faint != FAINT:  # folders made before the option keep their name
        key += (d.synthetic_faint,)
    if d.synthetic_dir:
        return Path(d.synthetic_dir).expanduser()
    base = Path(os.environ.get("HYBRID_ACCEL_CACHE", Path.home() / ".cache" / "hybrid_accel"))
    return base / f"synth-{d.synthetic_kind}-{derive_seed(*key) % 16**10:010x}"


# ---------------------------------------------------------------------------------------------
# Hybrid datasets from a fully annotated folder


_OUTPUTS = ("manifest.csv", "dataset.yaml", "masks", "weak", "images")


def _check_out(source: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output that would write into the source or replace an existing folder's files.

    Usage errors (ValueError, exit status 2), checked before anything is read or written.
    """
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise ValueError(f"--out {out} is inside the source folder {source}: prepare writes masks and a "
                         "manifest there, and a later prepare would read them as annotations; choose an "
                         "output folder outside the source")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        held = [n for n in _OUTPUTS if (out / n).exists()]
        raise ValueError(f"--out {out} already exists and is not empty"
                         + (f" (it holds {', '.join(held)})" if held else "")
                         + "; choose a new folder or pass --overwrite to replace its dataset")
    for a in out.parents:
        if a.exists() and not a.is_dir():
            raise ValueError(f"--out {out}: {a} is a file, not a folder")


def _is_hybrid_manifest(header: Sequence[str]) -> bool:
    # prepare/synth write split and kind columns; a source list of annotations has neither
    return "kind" in header and "split" in header


def find_pairs(source: str | os.PathLike, csv_path: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """(image, mask, group) of every annotated image under ``source``.

    With a CSV (``csv_path``, else the only ``*.csv`` in ``source`` that has image and mask
    columns) rows give the paths, relative to the CSV's folder, and the group comes from its
    group/sequence/patient/video/case column when there is one. Otherwise images in
    ``source/images`` are matched by file stem with masks in ``source/masks``, each its own group.
    """
    source = Path(source)
    if not source.is_dir():
        raise DatasetError(f"{source}: source folder not found")
    candidates = [Path(csv_path)] if csv_path else sorted(source.glob("*.csv"))
    for cp in candidates:
        if not cp.exists():
            raise DatasetError(f"{cp}: CSV not found")
        with cp.open(newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if _is_hybrid_manifest(header):
                raise DatasetError(
                    f"{cp}: a hybrid manifest written by hybrid_accel (columns split, kind), not a list of exact "
                    "annotations: its weak rows' masks are simulated. Prepare from the original annotations "
                    "(remove this file from the source or pass --csv with the source's own list); a prepared "
                    "dataset is used as it is (data.root)")
            if "image" not in header or "mask" not in header:
                if csv_path:
                    raise DatasetError(f"{cp}: needs image and mask columns (has: {', '.join(header)})")
                continue
            gcol = next((g for g in GROUP_COLUMNS if g in header), None)
            pairs = []
            for i, row in enumerate(reader):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                img, msk = cp.parent / row["image"], cp.parent / row["mask"]
                pairs.append({"image": str(img), "mask": str(msk),
                              "group": row[gcol] if gcol and row[gcol] else f"row{i}"})
            return pairs
    img_dir, mask_dir = source / "images", source / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DatasetError(f"{source}: expected a CSV with image and mask columns, or images/ and masks/ folders")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS}
    pairs = []
    missing = []
    for p in sorted(img_dir.iterdir(), key=lambda q: (len(q.stem), q.stem)):
        if p.suffix.lower() not in IMAGE_EXTS:
            continue
        if p.stem not in masks:
            missing.append(f"{p}: no mask with the same name in {mask_dir}")
            continue
        pairs.append({"image": str(p), "mask": str(masks[p.stem]), "group": p.stem})
    if missing:
        raise DatasetError.from_problems(missing)
    return pairs


def split_groups(
    groups: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Map each distinct group to train/val/test, by group count, shuffled by ``seed``.

    Test and val each get ``round(fraction * n_groups)`` groups (at least one when the fraction
    is positive), and train keeps at least one group.
    """
    uniq = sorted(set(groups), key=lambda g: (len(g), g))
    n = len(uniq)
    n_test = max(1 if test_fraction > 0 else 0, int(round(test_fraction * n)))
    n_val = max(1 if val_fraction > 0 else 0, int(round(val_fraction * n)))
    if n_test + n_val >= n:
        raise DatasetError(
            f"{n} group(s) cannot be split into val ({n_val}), test ({n_test}) and a non-empty train split"
        )
    order = np.random.default_rng([seed, 4]).permutation(n)
    out = {}
    for rank, k in enumerate(order):
        out[uniq[k]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def _raw_counts(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.bincount(mask_array(im, path).ravel().astype(np.int64).clip(0, 255), minlength=256)


def _detect_mapping(mask_paths: Sequence[str]) -> dict[int, int] | None:
    """0/255 binary masks -> {0: 0, 255: 1}; 0/255 masks saved lossy (values spread near 0 and
    255, as JPEG leaves them) -> threshold at 128, said on stdout; few values -> class indices (None).

    Every mask is read (threads: decoding releases the GIL), since a 0/255 dataset whose first
    masks happen to be empty would otherwise be taken as background + ignore. More than
    MAX_MASK_VALUES values in a mask that does not look binary is refused, naming the mask."""
    total = np.zeros(256, dtype=np.int64)
    worst, worst_n = None, 0
    with ThreadPoolExecutor(4) as ex:
        for path, c in zip(mask_paths, ex.map(_raw_counts, mask_paths)):
            total += c
            n = int((c > 0).sum())
            if n > worst_n:
                worst, worst_n = path, n
    values = set(np.flatnonzero(total).tolist())
    if values <= {0, 255} and 255 in values:
        return {0: 0, 255: 1}
    if looks_lossy_binary(total):
        print(f"note: the masks are binary up to compression noise ({len(values)} values, e.g. {worst_n} in "
              f"{worst}): thresholded at 128 (values >= 128 are class 1); pass --mask-mapping to choose another "
              "mapping", flush=True)
        return threshold_mapping(128)
    if worst_n > MAX_MASK_VALUES:
        raise DatasetError(too_many_values_message(worst, worst_n, False))
    return None


def _prepare_one(
    i: int, image: str, mask: str, out: str, split: str, row_kind: str, weak_type: str, severity: float,
    group: str, mapping: dict | None, ignore_index: int, seed: int, copy_images: bool,
) -> dict[str, Any]:
    outp = Path(out)
    name = f"{i:05d}_{Path(image).stem}"
    try:
        with Image.open(mask) as im:
            exact = apply_mask_mapping(mask_array(im, mask), mapping)
        with Image.open(image) as im:
            isize = im.size
    except (OSError, ValueError) as e:  # PIL raises both for unreadable files
        raise DatasetError(f"{getattr(e, 'filename', None) or image}: cannot read ({e})") from None
    if isize != (exact.shape[1], exact.shape[0]):
        raise DatasetError(f"{mask}: mask size {exact.shape[1]}x{exact.shape[0]} differs from image {image} size {isize[0]}x{isize[1]}")
    img_out = image
    if copy_images:
        img_out = str(outp / "images" / f"{name}{Path(image).suffix.lower()}")
        shutil.copyfile(image, img_out)
    rec = _manifest_row(outp, name, img_out, exact, split, row_kind, group, weak_type, severity, seed, i, ignore_index)
    rec["_max"] = int(exact[exact != ignore_index].max(initial=0))
    return rec


def _subset_pairs(
    pairs: list[dict[str, str]], max_groups: int | None, max_per_group: int | None
) -> list[dict[str, str]]:
    """The first ``max_groups`` groups in natural order and the first ``max_per_group`` pairs of
    each (None: no limit); ``pairs`` as they are when neither limit is given."""
    if max_groups is None and max_per_group is None:
        return pairs
    by_group: dict[str, list[dict]] = {}
    for p in pairs:
        by_group.setdefault(p["group"], []).append(p)
    keys = sorted(by_group, key=lambda g: (len(g), g))[: max_groups or None]
    return [p for g in keys for p in by_group[g][: max_per_group or None]]


def _check_pairs_exist(pairs: list[dict[str, str]]) -> None:
    """One DatasetError naming every image or mask file that does not exist."""
    missing = [f"{f}: file not found" for p in pairs for f in (p["image"], p["mask"]) if not Path(f).exists()]
    if missing:
        raise DatasetError.from_problems(missing)


def _source_mask_mapping(
    pairs: list[dict[str, str]], mask_mapping: str | dict | None, source: str | os.PathLike
) -> dict | None:
    """The mapping from the source's mask values to class indices: detected from every mask for
    ``"auto"``, else parsed from ``mask_mapping``."""
    try:
        return (_detect_mapping([p["mask"] for p in pairs]) if mask_mapping == "auto"
                else parse_mask_mapping(mask_mapping))
    except OSError as e:
        raise DatasetError(f"{getattr(e, 'filename', None) or source}: unreadable mask ({e})") from None


def _train_plan(
    pairs: list[dict[str, str]], group_split: dict[str, str], strong_fraction: float | None,
    strong_count: int | None, spec: WeakSpec, seed: int, strong_by: str = "frame",
) -> dict[int, tuple[str, str, float]]:
    """(kind, weak simulator, severity) of each train pair, by its index in ``pairs``."""
    train_idx = [i for i, p in enumerate(pairs) if group_split[p["group"]] == "train"]
    groups = [pairs[i]["group"] for i in train_idx] if strong_by == "group" else None
    return dict(zip(train_idx, _assign_kinds(len(train_idx), strong_fraction, strong_count, spec, seed, groups)))


def _reset_out(out: Path, overwrite: bool, copy_images: bool) -> None:
    """Create the output folders; with ``overwrite``, first remove a previous dataset's files
    (its stale masks must not survive beside the new ones)."""
    if overwrite:
        for sub in _OUTPUTS:
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
            else:
                (out / sub).unlink(missing_ok=True)
    for sub in ("masks", "weak") + (("images",) if copy_images else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)


def _prepare_jobs(
    pairs: list[dict[str, str]], group_split: dict[str, str], plan: dict[int, tuple[str, str, float]],
    out: Path, mapping: dict | None, ignore_index: int, seed: int, copy_images: bool,
) -> list[tuple]:
    """The arguments of :func:`_prepare_one` for each pair, in order (pairs outside the plan are strong)."""
    jobs = []
    for i, p in enumerate(pairs):
        split = group_split[p["group"]]
        row_kind, wt, sev = plan.get(i, ("strong", "", math.nan))
        jobs.append((i, str(Path(p["image"]).absolute()), p["mask"], str(out), split, row_kind, wt, sev,
                     p["group"], mapping, ignore_index, seed, copy_images))
    return jobs


def _prepared_num_classes(records: list[dict[str, Any]], num_classes: int | None, source: str | os.PathLike) -> int:
    """Take each record's ``_max`` (its largest class) out; return ``num_classes``, checked
    against them, or (None) one more than the largest class, at least 2."""
    top = max(r.pop("_max") for r in records)
    if num_classes is None:
        return max(2, top + 1)
    if top >= num_classes:
        raise DatasetError(f"{source}: masks hold class {top} but num_classes={num_classes}")
    return num_classes


def prepare_hybrid(
    source: str | os.PathLike,
    out: str | os.PathLike,
    csv_path: str | os.PathLike | None = None,
    strong_fraction: float | None = 0.1,
    strong_count: int | None = None,
    strong_by: str = "frame",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    weak: str | dict = "ellipse",
    severity: str | float = "uniform:0,1",
    drop_fraction: float = 0.4,
    seed: int = 0,
    mask_mapping: str | dict | None = "auto",
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    ignore_index: int = 255,
    copy_images: bool = False,
    max_groups: int | None = None,
    max_per_group: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Turn a fully annotated folder into a hybrid dataset in ``out``; return the manifest's path.

    Groups (patients, video sequences) are split into train/val/test so no group straddles two
    splits; in train, ``strong_count`` images (else ``strong_fraction`` of them) keep their exact
    masks and the rest get simulated weak masks. Masks are converted to class indices with
    ``mask_mapping`` (``"auto"``: 0/255 binary masks become 0/1) and written to ``out``; images
    are referenced by absolute path unless ``copy_images``. ``max_groups`` / ``max_per_group``
    take a deterministic subset (the first groups in natural order, the first frames of each)
    for quick runs. ``out`` must not be inside ``source``, and must be new or empty unless
    ``overwrite`` (which first removes a previous dataset's files from it). ``strong_by="group"``
    makes the strong images whole train groups (drawn at random until they hold the strong count),
    not single frames: the setting in which the weak masks bring polyps the strong set lacks.
    """
    if strong_by not in STRONG_BY:
        raise ValueError(f"strong_by={strong_by!r}: use one of {', '.join(STRONG_BY)}")
    out = Path(out)
    pairs = find_pairs(source, csv_path)
    _check_out(Path(source), out, overwrite)
    if not pairs:
        raise DatasetError(f"{source}: no annotated images found")
    pairs = _subset_pairs(pairs, max_groups, max_per_group)
    _check_pairs_exist(pairs)
    mapping = _source_mask_mapping(pairs, mask_mapping, source)
    group_split = split_groups([p["group"] for p in pairs], val_fraction, test_fraction, seed)
    spec = WeakSpec(weak, severity, drop_fraction)
    plan = _train_plan(pairs, group_split, strong_fraction, strong_count, spec, seed, strong_by)
    _reset_out(out, overwrite, copy_images)
    jobs = _prepare_jobs(pairs, group_split, plan, out, mapping, ignore_index, seed, copy_images)
    records = _pool_map(_prepare_one, jobs, workers, progress, "prepare")
    num_classes = _prepared_num_classes(records, num_classes, source)
    meta = {
        "name": Path(source).name,
        "num_classes": int(num_classes),
        "class_names": list(class_names) if class_names else ["background"] + [f"class{c}" for c in range(1, num_classes)],
        "ignore_index": ignore_index,
        "mask_mapping": None,
        "source": {"folder": str(Path(source).absolute()), "source_mask_mapping": mapping, "seed": seed,
                   "strong_fraction": strong_fraction, "strong_count": strong_count, "strong_by": strong_by,
                   "val_fraction": val_fraction, "test_fraction": test_fraction, "weak": str(weak),
                   "severity": str(severity), "drop_fraction": drop_fraction,
                   "max_groups": max_groups, "max_per_group": max_per_group},
    }
    write_meta(out, meta)
    return write_manifest(out, records)
