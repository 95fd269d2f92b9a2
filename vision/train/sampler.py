"""Data order that resumes exactly and is the same for any number of processes.

Each epoch is one seeded permutation, cut to whole global batches. Rank r of W takes every
W-th element, so the samples of global step k are the same set whatever W is: a 2-process
run sees exactly the batches a 1-process run with the same global batch sees. Each sample
also gets its own seed from (seed, epoch, index), so random augmentation does not depend on
workers, ranks or interruptions.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vision.errors import ConfigError


class ResumableSampler(Sampler):
    def __init__(self, num_samples: int, global_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if global_batch % world_size:
            raise ConfigError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if num_samples < global_batch:
            raise ConfigError(f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch} "
                              "(--batch-size)")
        self.n, self.batch, self.rank, self.world = num_samples, global_batch, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch

    def set_position(self, epoch: int, step_in_epoch: int) -> None:
        self.epoch, self.start_step = epoch, step_in_epoch

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch // self.world

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        shard = order[: self.steps_per_epoch * self.batch][self.rank :: self.world]
        start = self.start_step * self.batch // self.world
        for i in shard[start:].tolist():
            yield (i, self.epoch)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SeededDataset(Dataset):
    """Wraps a dataset for ResumableSampler keys (index, epoch).

    If the dataset has `sample(index, generator)`, every random draw of its augmentation goes
    through that per-sample generator; otherwise plain `dataset[index]` is used.
    """

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        if hasattr(self.dataset, "sample"):
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset.sample(index, g)
        return self.dataset[index]
