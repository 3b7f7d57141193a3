"""The training/evaluation ``Dataset`` over a manifest (the HybridDataset contract)."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DatasetError
from .manifest import KINDS, SPLITS, load_manifest, parse_mask_mapping, read_image, read_mask
from .transforms import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, transform_pair
from .weak import boundary_band

KIND_STRONG, KIND_WEAK = 0, 1


class HybridDataset(Dataset):
    """Images of one split of a manifest, with strong and weak index spaces.

    Item ``i`` is a dict: ``image`` float32 [3, H, W] (normalised with ``mean``/``std``), ``mask`` int64
    [H, W] (class indices, ``ignore_index`` where unlabelled), ``index`` = ``i`` (stable: the
    manifest order of the selected rows), ``kind`` (0 strong, 1 weak), ``weak_index`` (rank of
    ``i`` among the weak rows, 0..n_weak-1, -1 for strong: the DII index) and ``quality`` (true
    IoU of a weak mask, nan when unknown or strong).

    Args:
        root: dataset folder (holding ``manifest.csv``) or a manifest CSV.
        split: ``"train"``, ``"val"`` or ``"test"``.
        kinds: which annotation kinds to keep.
        image_size: output (H, W) or one int for square; None keeps each image's size.
        augment: random zoom/rotation/shift, flips and colour jitter (``AugmentConfig``, or
            ``True`` for the defaults).
        use_true_masks: load each weak row's true mask instead of its weak mask (the fully
            supervised baseline); ``kind`` and ``weak_index`` are unchanged.
        ignore_index: ignore value of the returned masks; the on-disk ignore value from
            ``dataset.yaml`` is remapped to it.
        mask_mapping: raw mask value -> class index, overriding ``dataset.yaml``'s.
        num_classes: overrides ``dataset.yaml``'s (needed only when there is none).
        mean, std: per-channel input normalisation on [0, 1] values, the network's
            (``hybrid_accel.model.input_norm``); ImageNet's when not given.
        weak_boundary_band: when > 0, items also carry ``band``, bool [H, W]: for a weak mask (not a
            true mask loaded by ``use_true_masks``) the pixels within this fraction of each object's
            equivalent radius of its outline, on either side, drawn after resizing and augmentation
            (:func:`hybrid_accel.data.weak.boundary_band`); all False for strong and dropped
            masks. ``mask`` itself is unchanged: the trainer decides what the band teaches.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        kinds: Sequence[str] = ("strong", "weak"),
        image_size: int | Sequence[int] | None = None,
        augment: bool | AugmentConfig = False,
        use_true_masks: bool = False,
        ignore_index: int = 255,
        mask_mapping: Mapping[int, int] | str | None = None,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        weak_boundary_band: float = 0.0,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"kinds must be among {KINDS}, got {bad}")
        man = load_manifest(root)
        self.manifest = man
        self.root = man.folder
        self.split = split
        self.num_classes = num_classes if num_classes is not None else man.num_classes
        if self.num_classes is None:
            raise DatasetError(f"{man.folder / 'dataset.yaml'}: missing (or without num_classes); pass num_classes")
        self.ignore_index = int(ignore_index)
        self.disk_ignore_index = man.ignore_index
        self.mask_mapping = parse_mask_mapping(mask_mapping) if mask_mapping is not None else man.mask_mapping
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.augment = AugmentConfig() if augment is True else (augment or None)
        self.use_true_masks = use_true_masks
        if not (weak_boundary_band >= 0):
            raise ValueError(f"weak_boundary_band must be >= 0, got {weak_boundary_band}")
        self.weak_boundary_band = float(weak_boundary_band)
        # the network's input normalisation (hybrid_accel.model.input_norm); ImageNet's by default
        self.mean = np.asarray(IMAGENET_MEAN if mean is None else mean, dtype=np.float32)
        self.std = np.asarray(IMAGENET_STD if std is None else std, dtype=np.float32)

        self.records = [r for r in man.records if r["split"] == split and r["kind"] in kinds]
        self.kinds = np.array([KIND_STRONG if r["kind"] == "strong" else KIND_WEAK for r in self.records], dtype=np.int64)
        self.strong_indices = np.flatnonzero(self.kinds == KIND_STRONG)
        self.weak_indices = np.flatnonzero(self.kinds == KIND_WEAK)
        self._weak_rank = np.full(len(self.records), -1, dtype=np.int64)
        self._weak_rank[self.weak_indices] = np.arange(len(self.weak_indices))
        self.image_paths = [r["image"] for r in self.records]
        self.quality = np.array([r["quality_iou"] if r["kind"] == "weak" else math.nan for r in self.records],
                                dtype=np.float64)
        if use_true_masks:
            lacking = [f"{man.path} line {r['row']}: weak row has no true_mask (needed by use_true_masks)"
                       for r in self.records if r["kind"] == "weak" and not r["true_mask"]]
            if lacking:
                raise DatasetError.from_problems(lacking)
        self._mask_paths = [r["true_mask"] if (use_true_masks and r["kind"] == "weak") else r["mask"]
                            for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def n_strong(self) -> int:
        return len(self.strong_indices)

    @property
    def n_weak(self) -> int:
        return len(self.weak_indices)

    def mask_path(self, index: int) -> str:
        return self._mask_paths[index]

    def load_mask(self, index: int) -> np.ndarray:
        """The mask of item ``index`` at its stored size, mapped, with the output ignore value."""
        m = read_mask(self._mask_paths[index], self.mask_mapping).astype(np.int64)
        if self.disk_ignore_index != self.ignore_index:
            m[m == self.disk_ignore_index] = self.ignore_index
        return m

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.records):
            raise IndexError(index)
        image = read_image(self.image_paths[index])
        # Warped with the on-disk ignore value (it fits the 8-bit mask image), remapped after.
        mask = read_mask(self._mask_paths[index], self.mask_mapping)
        rng = None
        if self.augment is not None:
            # Seeded from torch's generator: deterministic under torch.manual_seed, different in
            # every DataLoader worker and epoch (each worker's torch seed is base_seed + id).
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        img_t, mask_t = transform_pair(image, mask, self.image_size, rng, self.augment, self.disk_ignore_index,
                                       self.mean, self.std)
        if self.disk_ignore_index != self.ignore_index:
            mask_t[mask_t == self.disk_ignore_index] = self.ignore_index
        item = {}
        if self.weak_boundary_band > 0:  # the band goes with the mask, which stays whole (the trainer applies it)
            banded = self.kinds[index] == KIND_WEAK and not self.use_true_masks
            width = self.weak_boundary_band if banded else 0.0  # strong and true masks: an empty band
            item["band"] = torch.from_numpy(boundary_band(mask_t.numpy(), width, self.ignore_index))
        return {
            "image": img_t,
            "mask": mask_t,
            "index": int(index),
            "kind": int(self.kinds[index]),
            "weak_index": int(self._weak_rank[index]),
            "quality": float(self.quality[index]),
            **item,
        }

    def __repr__(self) -> str:
        return (f"HybridDataset({str(self.root)!r}, split={self.split!r}, n={len(self)}, strong={self.n_strong}, "
                f"weak={self.n_weak}, num_classes={self.num_classes}, image_size={self.image_size})")
