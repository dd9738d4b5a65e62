"""Which samples an epoch visits, in which order, on which rank -- and each sample's
random stream. Shared by the threaded CPU loader and the DALI loader, so both see the
same batches and (for training) draw the same geometry and jitter for a sample.

Pure NumPy (no torch): DALI's spawned external-source workers import it.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` in ``epoch``: independent of which process,
    thread or rank computes it and of the batch it lands in."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


@dataclass(frozen=True)
class EpochPlan:
    """Sample order of every epoch, for one rank.

    Shuffled per epoch from ``(seed, epoch)``; with ``world_size`` > 1 the order is padded
    by wrapping around (or, with ``drop_last``, truncated) to a multiple of the world size
    and rank ``r`` takes every ``world_size``-th sample starting at ``r`` (as
    ``torch.utils.data.DistributedSampler`` does), so every rank sees the same number of
    batches. ``drop_last`` also drops this rank's last partial batch.
    """

    num_samples: int
    batch_size: int
    shuffle: bool = False
    drop_last: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")

    @property
    def samples_per_rank(self) -> int:
        if self.world_size == 1:
            return self.num_samples
        if self.drop_last:
            return self.num_samples // self.world_size
        return math.ceil(self.num_samples / self.world_size)

    @property
    def num_batches(self) -> int:
        per = self.samples_per_rank
        return per // self.batch_size if self.drop_last else math.ceil(per / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for ``epoch``, batch after batch (int64)."""
        n = self.num_samples
        if self.shuffle:
            order = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(epoch)]).permutation(n)
        else:
            order = np.arange(n)
        if self.world_size > 1 and n:
            order = np.resize(order, self.samples_per_rank * self.world_size)  # wraps around
            order = order[self.rank :: self.world_size]
        if self.drop_last:
            order = order[: self.num_batches * self.batch_size]
        return order.astype(np.int64)

    def batches(self, epoch: int) -> list[np.ndarray]:
        order = self.order(epoch)
        return [order[i : i + self.batch_size] for i in range(0, self.num_batches * self.batch_size, self.batch_size)]


def distributed_rank_world() -> tuple[int, int]:
    """(global rank, world size) of torch.distributed when initialised, else (0, 1)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler:
    """What Lightning's ``_set_sampler_epoch`` calls on a loader: ``loader.sampler.set_epoch``."""

    def __init__(self, loader):
        self._loader = weakref.ref(loader)

    def set_epoch(self, epoch: int) -> None:
        loader = self._loader()
        if loader is not None:
            loader.set_epoch(epoch)


class PlannedLoader:
    """What both loaders (threaded CPU, DALI) share: one :class:`EpochPlan` for this rank
    (``len()``, ``batch_size``) and the epoch counter Lightning sets through ``sampler``."""

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 rank: int | None, world_size: int | None):
        if rank is None or world_size is None:
            rank, world_size = distributed_rank_world()
        self.plan = EpochPlan(num_samples, batch_size, shuffle, drop_last, seed, rank, world_size)
        self.sampler = EpochSampler(self)
        self.batch_sampler = None  # Lightning inspects both
        self._next_epoch = 0

    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Sample order and augmentation of the next epoch come from ``(seed, epoch)``."""
        self._next_epoch = int(epoch)

    def take_epoch(self) -> int:
        """The epoch an iterator runs; the one after it is next unless ``set_epoch`` says otherwise.

        Loaders call it at an iterator's first batch, not at ``iter()``: Lightning calls
        ``iter()`` twice before it sets the first epoch (its iterable check, then its fetcher),
        and when resuming it sets the checkpoint's epoch after the fetcher's ``iter()`` without
        another one. An iterator that chose its epoch at ``iter()`` would run epoch 1's plan in
        epochs 0 and 1 and, resumed at epoch k, the plan of epoch 1 again."""
        epoch = self._next_epoch
        self._next_epoch += 1
        return epoch
