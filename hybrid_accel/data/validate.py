"""Check a dataset before training, and summarise it.

:func:`validate_dataset` opens every file the manifest lists and raises one
:class:`DatasetError` listing every problem, each naming its file (or manifest line) and what is
wrong: missing file, unreadable or corrupt image, mask of another size than its image, mask
values outside the classes and the ignore value, an empty strong set in train when the method
needs one, duplicate rows, unknown split or kind, missing class count.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .errors import DatasetError
from .manifest import (
    KINDS,
    MAX_MASK_VALUES,
    SPLITS,
    apply_mask_mapping,
    load_manifest,
    looks_lossy_binary,
    mask_array,
    parse_mask_mapping,
    too_many_values_message,
)


def _check_mask(path: str, what: str, image_size, mapping, num_classes, ignore_index, problems) -> np.ndarray | None:
    if not Path(path).is_file():
        problems.append(f"{path}: {what} file not found")
        return None
    try:
        with Image.open(path) as im:
            raw = mask_array(im, path)
            arr = apply_mask_mapping(raw, mapping)
    except DatasetError as e:
        problems.append(str(e))
        return None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
        problems.append(f"{path}: unreadable or corrupt {what} ({e})")
        return None
    if image_size is not None and (arr.shape[1], arr.shape[0]) != image_size:
        problems.append(
            f"{path}: {what} size {arr.shape[1]}x{arr.shape[0]} differs from its image's {image_size[0]}x{image_size[1]}"
        )
    n_values = len(np.unique(arr))
    if n_values > MAX_MASK_VALUES:  # not class indices: one clear message, not a list of bad values
        counts = np.bincount(raw.ravel().astype(np.int64).clip(0, 255), minlength=256)
        problems.append(too_many_values_message(path, n_values, looks_lossy_binary(counts)))
    elif num_classes is not None:
        vals = np.unique(arr)
        bad = vals[((vals < 0) | (vals >= num_classes)) & (vals != ignore_index)]
        if len(bad):
            shown = ", ".join(str(int(v)) for v in bad[:8])
            problems.append(
                f"{path}: {what} values {shown} outside the classes 0..{num_classes - 1} and ignore value {ignore_index}"
                + (" (after mask_mapping)" if mapping else "")
            )
    return arr


def _check_row(rec: Mapping[str, Any], mapping, num_classes, ignore_index, decode: bool) -> dict[str, Any]:
    problems: list[str] = []
    size = None
    img_path = rec["image"]
    if not Path(img_path).is_file():
        problems.append(f"{img_path}: image file not found")
    else:
        try:
            with Image.open(img_path) as im:
                size = im.size
                if decode:
                    im.load()  # decodes: catches truncated or corrupt data the header hides
        except (OSError, ValueError, SyntaxError) as e:
            problems.append(f"{img_path}: unreadable or corrupt image ({e})")
            size = None
    counts = None
    arr = _check_mask(rec["mask"], "mask", size, mapping, num_classes, ignore_index, problems)
    if arr is not None:
        counts = np.bincount(arr.ravel().astype(np.int64).clip(0, 255), minlength=256)
    if rec.get("true_mask") and rec["true_mask"] != rec["mask"]:
        _check_mask(rec["true_mask"], "true mask", size, mapping, num_classes, ignore_index, problems)
    return {"problems": problems, "size": size, "counts": counts}


def validate_dataset(
    root: str | os.PathLike,
    mask_mapping: Mapping[int, int] | str | None = None,
    num_classes: int | None = None,
    require_strong: bool = True,
    decode_images: bool = True,
    workers: int = 4,
    progress: bool = False,
) -> dict[str, Any]:
    """Check every row and file of the dataset at ``root``; return a summary (see
    :func:`format_data_summary`) or raise :class:`DatasetError` listing every problem.

    ``require_strong``: the train split must hold at least one strong image (every method but
    the weakly supervised baseline needs one). ``decode_images=False`` reads image headers only
    (faster; masks are always read in full, their values must be checked).
    """
    man = load_manifest(root)  # raises on unknown splits/kinds and malformed manifests
    mapping = parse_mask_mapping(mask_mapping) if mask_mapping is not None else man.mask_mapping
    ncls = num_classes if num_classes is not None else man.num_classes
    ignore = man.ignore_index
    problems: list[str] = []
    if ncls is None:
        problems.append(f"{man.folder / 'dataset.yaml'}: missing, or without num_classes (the class count)")

    seen: dict[str, int] = {}
    for r in man.records:
        key = os.path.normpath(r["image"])
        if key in seen:
            problems.append(f"{man.path} line {r['row']}: duplicate row, image {r['image']} already listed on line {seen[key]}")
        else:
            seen[key] = r["row"]
    if not man.records:
        problems.append(f"{man.path}: manifest has no rows")
    n_train_strong = sum(r["split"] == "train" and r["kind"] == "strong" for r in man.records)
    if require_strong and man.records and n_train_strong == 0:
        problems.append(f"{man.path}: no strong (exactly annotated) image in the train split; the method needs at least one")

    with ThreadPoolExecutor(max(1, workers)) as ex:
        results = list(tqdm(ex.map(lambda r: _check_row(r, mapping, ncls, ignore, decode_images), man.records),
                            total=len(man.records), desc="check", unit="img", disable=not progress))
    for res in results:
        problems.extend(res["problems"])
    if problems:
        raise DatasetError.from_problems(problems)
    return _summarise(man, results, ncls, ignore, mapping)


def _summarise(man, results, ncls, ignore, mapping) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {s: {k: 0 for k in KINDS} for s in SPLITS}
    pixels: dict[str, np.ndarray] = {s: np.zeros(256, dtype=np.int64) for s in SPLITS}
    sizes: Counter = Counter()
    quality: dict[str, list[float]] = defaultdict(list)
    groups: dict[str, set] = defaultdict(set)
    for r, res in zip(man.records, results):
        counts[r["split"]][r["kind"]] += 1
        pixels[r["split"]] += res["counts"]
        sizes[f"{res['size'][0]}x{res['size'][1]}"] += 1
        if r["kind"] == "weak":
            quality[r["weak_type"] or "unknown"].append(r["quality_iou"])
        if r["group"]:
            groups[r["group"]].add(r["split"])
    class_freq = {}
    for s in SPLITS:
        tot = pixels[s].sum()
        if tot:
            class_freq[s] = {"classes": [float(pixels[s][c] / tot) for c in range(ncls)],
                             "ignore": float(pixels[s][ignore] / tot)}
    warnings = []
    if not mapping:
        # 0/255 binary masks pass the value check (255 is the ignore value) yet train nothing.
        suspect = [r["mask"] for r, res in zip(man.records, results)
                   if r["kind"] == "strong" and res["counts"][ignore] > 0 and not res["counts"][1:ncls].any()]
        if suspect:
            warnings.append(
                f"{len(suspect)} strong mask(s) hold the ignore value {ignore} but no foreground class (e.g. "
                f"{suspect[0]}): if these are 0/255 binary masks, set mask_mapping 0:0,255:1"
            )
    straddling = sorted(g for g, ss in groups.items() if "test" in ss and len(ss) > 1)
    if straddling:
        warnings.append(f"{len(straddling)} group(s) appear in test and another split (leak): {', '.join(straddling[:5])}")
    qstats = {}
    for t, qs in sorted(quality.items()):
        q = np.array([v for v in qs if not math.isnan(v)])
        qstats[t] = {"n": len(qs), "mean_iou": float(q.mean()) if len(q) else math.nan,
                     "min_iou": float(q.min()) if len(q) else math.nan, "max_iou": float(q.max()) if len(q) else math.nan}
    return {
        "manifest": str(man.path),
        "num_classes": ncls,
        "class_names": man.meta.get("class_names"),
        "ignore_index": ignore,
        "mask_mapping": mapping,
        "n_images": len(man.records),
        "counts": counts,
        "class_frequencies": class_freq,
        "image_sizes": dict(sizes.most_common()),
        "weak_quality": qstats,
        "n_groups": len(groups),
        "warnings": warnings,
    }


def _format_sizes(sizes: Mapping[str, int], shown: int = 5) -> str:
    """The most common sizes, then the range and the count of the rest: one short line at any scale."""
    items = sorted(sizes.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k}: {v}" for k, v in items[:shown])
    if len(items) > shown:
        wh = [tuple(map(int, k.split("x"))) for k in sizes]
        rest = sum(v for _, v in items[shown:])
        text += (f", and {rest} more images in {len(items) - shown} other sizes ({len(items)} sizes, "
                 f"width {min(w for w, _ in wh)}..{max(w for w, _ in wh)}, "
                 f"height {min(h for _, h in wh)}..{max(h for _, h in wh)})")
    return text


def format_data_summary(s: Mapping[str, Any]) -> str:
    """A human-readable table of :func:`validate_dataset`'s summary."""
    names = s.get("class_names") or [str(c) for c in range(s["num_classes"])]
    lines = [f"dataset {s['manifest']}: {s['n_images']} images, {s['num_classes']} classes "
             f"({', '.join(names)}), ignore value {s['ignore_index']}, {s['n_groups']} groups"]
    lines.append(f"{'split':<6} {'strong':>7} {'weak':>7}   class pixel fractions (ignore)")
    for split, c in s["counts"].items():
        if not sum(c.values()):
            continue
        f = s["class_frequencies"].get(split)
        freq = " ".join(f"{v:.3f}" for v in f["classes"]) + f" ({f['ignore']:.3f})" if f else ""
        lines.append(f"{split:<6} {c['strong']:>7} {c['weak']:>7}   {freq}")
    lines.append("image sizes (WxH): " + _format_sizes(s["image_sizes"]))
    if s["weak_quality"]:
        lines.append("weak masks, true IoU against the exact mask:")
        for t, q in s["weak_quality"].items():
            lines.append(f"  {t:<9} n={q['n']:<6} mean {q['mean_iou']:.3f}  min {q['min_iou']:.3f}  max {q['max_iou']:.3f}")
    for w in s["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
