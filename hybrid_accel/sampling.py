"""Stateless, deterministic training samplers (DESIGN.md sections 3 and 8).

The batch of micro-step ``m`` of step ``t`` on process ``r`` for sampler stream ``s`` is drawn with a
generator seeded from ``(seed, s, r, t, m)`` alone, and each item's augmentation from a seed derived
from the same key. Nothing depends on how many batches were drawn before, so:

- resuming at step ``t`` draws exactly the batches an uninterrupted run would have drawn;
- worker prefetching is harmless: after a gamma update the trainer recreates the primary loader at
  the current step with the new weights, and the prefetched batches of the old one are dropped;
- every process draws different samples (the rank is part of the key), each process's own
  stream is reproducible, and no sampler state needs to be stored beyond the step count.

This is also why the training loaders are not passed through ``accelerator.prepare``: accelerate
would shard each batch across processes, while these samplers are already per process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "derive_seed",
    "make_generator",
    "StepSampler",
    "StepBatches",
    "KeyedDataset",
    "make_step_loader",
]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python runs)."""
    h = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def make_generator(*parts: Any) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


class StepSampler:
    """Indices of a batch as a pure function of (step, micro-step).

    ``weights=None``: uniform with replacement (the auxiliary sampler); else multinomial with
    replacement proportional to ``weights`` (the primary sampler under DII sampling: strong 1,
    weak gamma).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        stream: str,
        rank: int = 0,
        weights: torch.Tensor | np.ndarray | None = None,
    ):
        if n <= 0:
            raise ValueError(f"{stream} sampler: the dataset is empty")
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.stream = stream
        self.rank = int(rank)
        self.weights = None
        if weights is not None:
            w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
            if w.numel() != n or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"{stream} sampler: weights must be {n} finite non-negative values, not all zero")
            self.weights = w

    def key(self, step: int, micro: int = 0) -> tuple:
        return (self.seed, self.stream, self.rank, int(step), int(micro))

    def indices(self, step: int, micro: int = 0) -> np.ndarray:
        g = make_generator(*self.key(step, micro))
        if self.weights is None:
            idx = torch.randint(self.n, (self.batch_size,), generator=g)
        else:
            idx = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        return idx.numpy()

    def batch(self, step: int, micro: int = 0) -> list[tuple[int, int]]:
        """``[(dataset index, augmentation seed)]`` for one micro-batch."""
        key = self.key(step, micro)
        return [(int(i), derive_seed(*key, "item", k)) for k, i in enumerate(self.indices(step, micro))]


class StepBatches:
    """A ``batch_sampler`` for steps ``start..end-1`` (``accum`` micro-batches each)."""

    def __init__(self, sampler: StepSampler, start: int, end: int, accum: int = 1):
        self.sampler, self.start, self.end, self.accum = sampler, int(start), int(end), int(accum)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            for micro in range(self.accum):
                yield self.sampler.batch(step, micro)

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.accum


class KeyedDataset(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is ``base[index]`` under ``torch.manual_seed(seed)``.

    The data package draws its augmentation from torch's generator; seeding it per item makes the
    augmentation of every sample a function of the sampler key (exact resume, any worker count).
    """

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.base[int(index)]


def make_step_loader(
    dataset: KeyedDataset,
    sampler: StepSampler,
    start: int,
    end: int,
    accum: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=2)
    return DataLoader(
        dataset,
        batch_sampler=StepBatches(sampler, start, end, accum),
        num_workers=num_workers,
        pin_memory=pin_memory,
        **kwargs,
    )


def hybrid_weights(kinds: Sequence[int] | np.ndarray, weak_rank: np.ndarray, gamma: torch.Tensor | None,
                   floor: float = 0.0) -> np.ndarray:
    """Per dataset item: 1 for strong, ``max(gamma[weak rank], floor)`` for weak (1 everywhere when gamma
    is None). The floor keeps weak images in the primary tutorial while their gammas are still low."""
    kinds = np.asarray(kinds)
    w = np.ones(len(kinds), dtype=np.float64)
    if gamma is not None:
        g = gamma.detach().double().cpu().numpy()
        weak = kinds == 1
        w[weak] = np.maximum(g[np.asarray(weak_rank)[weak]], float(floor))
    return w
