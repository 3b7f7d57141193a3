"""Datasets for hybrid supervision: on-disk format, synthetic data, weak-label simulators.

See docs/data.md. The command line is ``python -m hybrid_accel.data {synth,prepare,check}``.
"""

from .build import (
    find_pairs,
    make_synthetic_dataset,
    make_synthetic_hybrid,
    prepare_hybrid,
    split_groups,
    synthetic_root,
)
from .dataset import KIND_STRONG, KIND_WEAK, HybridDataset
from .errors import DatasetError
from .manifest import (
    COLUMNS,
    Manifest,
    load_manifest,
    load_meta,
    parse_mask_mapping,
    read_image,
    read_mask,
    write_manifest,
    write_mask,
    write_meta,
)
from .synthetic import asoct_sample, polyp_sample, synthetic_sample
from .transforms import AugmentConfig, transform_pair
from .validate import format_data_summary, validate_dataset
from .weak import WeakSpec, simulate, weak_quality

__all__ = [
    "AugmentConfig",
    "COLUMNS",
    "DatasetError",
    "HybridDataset",
    "KIND_STRONG",
    "KIND_WEAK",
    "Manifest",
    "WeakSpec",
    "asoct_sample",
    "find_pairs",
    "format_data_summary",
    "load_manifest",
    "load_meta",
    "make_synthetic_dataset",
    "make_synthetic_hybrid",
    "parse_mask_mapping",
    "polyp_sample",
    "prepare_hybrid",
    "read_image",
    "read_mask",
    "simulate",
    "split_groups",
    "synthetic_root",
    "synthetic_sample",
    "transform_pair",
    "validate_dataset",
    "weak_quality",
    "write_manifest",
    "write_mask",
    "write_meta",
]
