"""On-disk dataset format: a manifest CSV, a metadata file beside it, and PNG masks.

A dataset is a folder holding

- ``manifest.csv``: one row per image with the columns in :data:`COLUMNS` (only ``image``,
  ``mask``, ``split`` and ``kind`` are required); paths are relative to the manifest's folder
  or absolute;
- ``dataset.yaml``: ``num_classes``, ``ignore_index``, ``mask_mapping`` (raw mask value ->
  class index, applied to every mask the manifest lists), ``class_names`` and how the data was
  made.

Masks are single-channel PNGs of class indices ``0..num_classes-1`` plus one ignore value.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import yaml
from PIL import Image

from .errors import DatasetError

MANIFEST_NAME = "manifest.csv"
META_NAME = "dataset.yaml"
REQUIRED_COLUMNS = ("image", "mask", "split", "kind")
COLUMNS = (
    "image",
    "mask",
    "split",
    "kind",
    "group",
    "true_mask",
    "quality_iou",
    "quality_dice",
    "weak_type",
    "severity",
)
SPLITS = ("train", "val", "test")
KINDS = ("strong", "weak")
FLOAT_COLUMNS = ("quality_iou", "quality_dice", "severity")
PATH_COLUMNS = ("image", "mask", "true_mask")


@dataclass
class Manifest:
    """A parsed manifest: resolved rows plus the dataset metadata."""

    path: Path
    records: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def num_classes(self) -> int | None:
        n = self.meta.get("num_classes")
        return None if n is None else int(n)

    @property
    def ignore_index(self) -> int:
        return int(self.meta.get("ignore_index", 255))

    @property
    def mask_mapping(self) -> dict[int, int] | None:
        return parse_mask_mapping(self.meta.get("mask_mapping"))


def manifest_path(root: str | os.PathLike) -> Path:
    """The manifest of ``root``: ``root`` itself when it is a file, else ``root/manifest.csv``."""
    p = Path(root)
    return p if p.suffix.lower() == ".csv" else p / MANIFEST_NAME


MAX_MASK_VALUES = 32  # more distinct raw values than this in one mask is not a map of class indices
_NOISE = 48  # values this close to 0 or 255 count as compression noise of a 0/255 mask


def threshold_mapping(t: int) -> dict[int, int]:
    """``threshold:T``: raw values >= T become class 1, the rest class 0 (8-bit masks)."""
    return {v: int(v >= t) for v in range(256)}


def _as_threshold(mapping: Mapping[int, int]) -> int | None:
    if set(mapping) != set(range(256)):
        return None
    t = next((v for v in range(256) if mapping[v] == 1), None)
    return t if t is not None and mapping == threshold_mapping(t) else None


def looks_lossy_binary(counts: np.ndarray) -> bool:
    """A 256-bin histogram of raw mask values: a 0/255 mask saved lossy (JPEG), values spread near 0 and 255?"""
    n = int(counts.sum())
    if n == 0 or int((counts > 0).sum()) <= 2 or not counts[256 - _NOISE :].any():
        return False
    return counts[:_NOISE].sum() + counts[256 - _NOISE :].sum() >= 0.97 * n


def too_many_values_message(path: Any, n_values: int, lossy: bool) -> str:
    """The one message for masks that are not class indices (prepare, check and training say the same)."""
    if lossy:
        return (f"{path}: mask has {n_values} different values, spread around 0 and 255: a binary mask saved "
                "lossy (JPEG?). Map it with the mask mapping threshold:128 (data prepare/check --mask-mapping "
                "threshold:128, or data.mask_mapping=threshold:128 in training)")
    return (f"{path}: mask has {n_values} different values (more than {MAX_MASK_VALUES}); masks must hold class "
            "indices: pass a mask mapping (raw:class pairs such as 0:0,255:1, or threshold:T)")


def parse_mask_mapping(spec: Any) -> dict[int, int] | None:
    """Accept ``None``, a dict, or a string such as ``"0:0,255:1"`` or ``"threshold:128"``; return ``{raw: class}``."""
    if spec is None or spec == "" or spec == {}:
        return None
    if isinstance(spec, str):
        if spec.lower() in ("none", "identity"):
            return None
        if spec.lower().startswith("threshold:"):
            try:
                t = int(spec.split(":", 1)[1])
            except ValueError:
                t = -1
            if not 1 <= t <= 255:
                raise DatasetError(f"mask mapping {spec!r}: threshold:T needs an integer T in 1..255, such as threshold:128")
            return threshold_mapping(t)
        out = {}
        for part in spec.split(","):
            try:
                raw, cls = part.split(":")
                out[int(raw)] = int(cls)
            except ValueError:
                raise DatasetError(
                    f"mask mapping {spec!r}: expected comma-separated raw:class pairs, such as 0:0,255:1"
                ) from None
        return out
    if isinstance(spec, Mapping):
        return {int(k): int(v) for k, v in spec.items()}
    raise DatasetError(f"mask mapping {spec!r}: expected a dict or a string such as 0:0,255:1")


def format_mask_mapping(mapping: Mapping[int, int] | None) -> str:
    t = _as_threshold(mapping) if mapping else None
    if t is not None:
        return f"threshold:{t}"
    return "identity" if not mapping else ",".join(f"{k}:{v}" for k, v in sorted(mapping.items()))


def load_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """Read ``dataset.yaml`` in ``folder`` (an empty dict when there is none)."""
    path = Path(folder) / META_NAME
    if not path.exists():
        return {}
    try:
        meta = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a mapping of keys to values")
    return meta


def write_meta(folder: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    path = Path(folder) / META_NAME
    clean = dict(meta)
    if clean.get("mask_mapping"):
        clean["mask_mapping"] = {int(k): int(v) for k, v in clean["mask_mapping"].items()}
    path.write_text(yaml.safe_dump(clean, sort_keys=False))
    return path


def _to_float(value: str) -> float:
    if value is None or value.strip() == "":
        return math.nan
    return float(value)


def load_manifest(root: str | os.PathLike, check_values: bool = True) -> Manifest:
    """Parse a manifest and its metadata; paths become absolute.

    Raises :class:`DatasetError` for a missing or malformed manifest and, with ``check_values``,
    for unknown splits or kinds and unparsable numbers (all such problems in one message).
    Files are not opened here: see :func:`hybrid_accel.data.validate.validate_dataset`.
    """
    path = manifest_path(root)
    if not path.exists():
        raise DatasetError(f"{path}: manifest not found")
    folder = path.parent
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read manifest ({e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DatasetError(f"{path}: manifest lacks column(s) {', '.join(missing)} (has: {', '.join(header)})")

    problems = []
    records = []
    for i, row in enumerate(rows):
        line = i + 2  # 1-based, after the header
        rec: dict[str, Any] = {k: (v or "").strip() for k, v in row.items() if k is not None}
        for col in COLUMNS:
            rec.setdefault(col, "")
        rec["row"] = line
        for col in PATH_COLUMNS:
            if rec[col]:
                rec[col] = str(_resolve(folder, rec[col]))
        if check_values:
            where = f"{path} line {line}"
            if rec["split"] not in SPLITS:
                problems.append(f"{where}: unknown split {rec['split']!r} (expected one of {', '.join(SPLITS)})")
            if rec["kind"] not in KINDS:
                problems.append(f"{where}: unknown kind {rec['kind']!r} (expected one of {', '.join(KINDS)})")
            if not rec["image"]:
                problems.append(f"{where}: empty image path")
            if not rec["mask"]:
                problems.append(f"{where}: empty mask path")
        for col in FLOAT_COLUMNS:
            try:
                rec[col] = _to_float(rec[col])
            except ValueError:
                problems.append(f"{path} line {line}: column {col} is not a number ({rec[col]!r})")
                rec[col] = math.nan
        records.append(rec)
    if problems:
        raise DatasetError.from_problems(problems)
    return Manifest(path=path, records=records, meta=load_meta(folder))


def _resolve(folder: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else folder / q


def _relative(folder: Path, p: str | os.PathLike) -> str:
    """Path relative to ``folder`` when it lies under it, else absolute."""
    if not p:
        return ""
    q = Path(p).absolute()
    try:
        return q.relative_to(folder.absolute()).as_posix()
    except ValueError:
        return str(q)


def write_manifest(folder: str | os.PathLike, records: Iterable[Mapping[str, Any]], name: str = MANIFEST_NAME) -> Path:
    """Write rows (dicts with :data:`COLUMNS` keys; extra keys ignored) to ``folder/name``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for rec in records:
            out = {}
            for col in COLUMNS:
                v = rec.get(col, "")
                if col in PATH_COLUMNS:
                    v = _relative(folder, v)
                elif col in FLOAT_COLUMNS:
                    v = "" if v is None or (isinstance(v, float) and math.isnan(v)) or v == "" else f"{float(v):.6g}"
                out[col] = v
            w.writerow(out)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Image and mask files


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 array [H, W, 3]; greyscale images are replicated to three channels."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def mask_array(im: Image.Image, path: str | os.PathLike = "") -> np.ndarray:
    """Raw values of a single-channel mask image (no mapping applied)."""
    mode = im.mode
    if mode in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(im)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        return arr
    if mode in ("LA", "PA"):
        return np.asarray(im)[..., 0]
    if mode in ("RGB", "RGBA"):
        arr = np.asarray(im)[..., :3]
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
            return arr[..., 0]
        raise DatasetError(
            f"{path}: mask has colour ({mode}) values; expected a single-channel PNG of class indices"
        )
    raise DatasetError(f"{path}: unsupported mask image mode {mode}")


def apply_mask_mapping(arr: np.ndarray, mapping: Mapping[int, int] | None) -> np.ndarray:
    """Map raw mask values to class indices; values not in ``mapping`` are kept."""
    if not mapping:
        return arr
    top = max(int(arr.max(initial=0)), max(mapping)) + 1
    lut = np.arange(top, dtype=np.int64)
    for raw, cls in mapping.items():
        if raw >= 0:
            lut[raw] = cls
    out = lut[arr]
    return out.astype(np.uint8) if out.max(initial=0) <= 255 and out.min(initial=0) >= 0 else out


def read_mask(path: str | os.PathLike, mapping: Mapping[int, int] | None = None) -> np.ndarray:
    """Class-index mask [H, W] (uint8 for the usual < 256 values) after ``mapping``."""
    with Image.open(path) as im:
        arr = mask_array(im, path)
    return apply_mask_mapping(arr, mapping)


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a class-index mask as an 8-bit PNG (values must lie in 0..255)."""
    m = np.asarray(mask)
    if m.min(initial=0) < 0 or m.max(initial=0) > 255:
        raise ValueError(f"{path}: mask values must lie in 0..255 to be written as 8-bit PNG")
    Image.fromarray(m.astype(np.uint8), mode="L").save(path, compress_level=1)
