"""Sampling: the deterministic, resumable, DDP-aware order in which a step sees its training images.

:class:`StepSampler` yields ``(index, sample_seed)`` pairs; the seed (:func:`sample_seeds`) drives the
augmentation of that sample, so the sample seen at a given (epoch, position) is the same whatever the
number of loader workers and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1


def sample_seeds(seed: int, epoch: int, positions: np.ndarray) -> list[int]:
    """Seeds (63-bit ints) of the samples at ``positions`` of the epoch's permutation.

    A splitmix64 hash of (seed, epoch, position), so neighbouring positions, epochs and seeds give
    unrelated augmentations. numpy uint64 arithmetic wraps modulo 2**64, which the hash relies on.
    """
    base = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + (epoch & _MASK64) * 0xD1B54A32D192ED03) & _MASK64
    x = positions.astype(np.uint64) + np.uint64(base)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return [int(v) for v in x >> np.uint64(1)]


class StepSampler(Sampler):
    """Deterministic, resumable, DDP-aware sampler yielding ``(index, sample_seed)`` pairs.

    Epoch e shuffles with ``torch.randperm(num_items)`` from a generator seeded ``seed + e``, pads the
    permutation to a multiple of ``world_size`` by repeating its head (like ``DistributedSampler``) and
    gives rank r the positions ``r::world_size``. Each rank then keeps a multiple of ``batch_size``
    samples so every batch is full, unless it has fewer than one batch, in which case it keeps them all.
    The sample seed depends on (seed, epoch, position in the padded permutation) only, so augmentation
    does not depend on the number of loader workers or on a resume.

    Usage, where ``batch_size`` is the per-rank batch size of the DataLoader::

        sampler = StepSampler(len(dataset), batch_size, seed=cfg.seed, rank=rank, world_size=world_size)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
        for epoch in range(first_epoch, epochs):
            # resuming after `done` batches of this epoch: start=done * batch_size, else 0
            sampler.set_epoch(epoch, start=done * batch_size if epoch == first_epoch else 0)
            for images, labels in loader:  # (N, 3, H, W) float32, (N, H, W) int64
                ...
    """

    def __init__(
        self, num_items: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_items < 0 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"StepSampler: need num_items >= 0, batch_size >= 1 and 0 <= rank < world_size; got "
                f"{num_items}, {batch_size}, rank {rank}, world_size {world_size}"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def _samples_per_rank(self) -> int:
        """Samples this rank yields in a whole epoch (full batches only, unless under one batch)."""
        per_rank = math.ceil(self.num_items / self.world_size)
        return per_rank if per_rank < self.batch_size else per_rank - per_rank % self.batch_size

    def batches_per_epoch(self) -> int:
        """Batches each rank gets in one epoch (all full but possibly one when under one batch)."""
        return math.ceil(self._samples_per_rank() / self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch, and skip the first ``start`` samples of this rank (resume mid-epoch)."""
        if not 0 <= start <= self._samples_per_rank():
            raise ValueError(f"StepSampler: start {start} is outside 0..{self._samples_per_rank()}")
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return self._samples_per_rank() - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.num_items == 0:
            return iter(())
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).numpy()
        total = math.ceil(self.num_items / self.world_size) * self.world_size
        order = np.resize(order, total)  # repeats the head to pad, as DistributedSampler does
        positions = np.arange(self.rank, total, self.world_size)[self.start : self._samples_per_rank()]
        seeds = sample_seeds(self.seed, self.epoch, positions)
        return iter(zip(order[positions].tolist(), seeds, strict=True))
