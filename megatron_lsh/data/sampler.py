"""Resumable batch samplers (Megatron's pretraining samplers) and the data loader built on them.

Both samplers walk a global order of sample indices in global batches of
``micro_batch_size * data_parallel_size``; each data-parallel rank takes its slice of every
global batch. They start at ``consumed_samples`` (the count the trainer stores in its
checkpoint), so a resumed run yields exactly the batches an uninterrupted run would have
yielded next. The sampler itself keeps no state: the DataLoader prefetches ahead, so only the
trainer knows how many samples were really consumed.
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import numpy as np
import torch

from .errors import DataError


def _check(total: int, consumed: int, micro: int, rank: int, size: int) -> None:
    if total <= 0:
        raise DataError(f"the dataset has no samples (total_samples = {total})")
    if micro <= 0:
        raise DataError(f"micro_batch_size must be positive, got {micro}")
    if size <= 0:
        raise DataError(f"data_parallel_size must be positive, got {size}")
    if not 0 <= rank < size:
        raise DataError(f"data_parallel_rank {rank} is outside 0..{size - 1}")
    if consumed < 0:
        raise DataError(f"consumed_samples must be non-negative, got {consumed}")


class MegatronPretrainingSampler:
    """Samples in order ``consumed_samples, consumed_samples + 1, ...`` up to ``total_samples``.

    The datasets already shuffle, so order here is the dataset's order. The last partial
    global batch is dropped unless ``drop_last`` is False.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if consumed_samples >= total_samples:
            raise DataError(f"consumed_samples ({consumed_samples}) is not below total_samples "
                            f"({total_samples}): no data left")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last
        self.global_batch = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.global_batch)
        partial = (not self.drop_last) and rest > self.data_parallel_rank * self.micro_batch_size
        return full + int(partial)

    def _slice(self, batch: List[int]) -> List[int]:
        start = self.data_parallel_rank * self.micro_batch_size
        return batch[start:start + self.micro_batch_size]

    def __iter__(self) -> Iterator[List[int]]:
        for start in range(self.consumed_samples, self.total_samples, self.global_batch):
            batch = list(range(start, min(start + self.global_batch, self.total_samples)))
            if len(batch) < self.global_batch:
                if self.drop_last:
                    return
                mine = self._slice(batch)
                if mine:
                    yield mine
                return
            yield self._slice(batch)


class MegatronPretrainingRandomSampler:
    """Endless epochs over ``dataset_size`` samples, each epoch in a fresh order from ``seed``.

    Epoch e is ``permutation(dataset_size)`` from ``RandomState(seed + e)``, cut to whole
    global batches (or to ``samples_per_epoch``, a multiple of them: fine-tuning cuts epochs
    to whole optimizer steps); ``consumed_samples`` counts samples over all epochs.
    """

    def __init__(self, dataset_size: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, seed: int = 1234,
                 samples_per_epoch: Optional[int] = None):
        _check(dataset_size, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        self.global_batch = micro_batch_size * data_parallel_size
        if dataset_size < self.global_batch:
            raise DataError(f"the dataset has {dataset_size} samples, fewer than one global batch "
                            f"({self.global_batch})")
        self.dataset_size = dataset_size
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.seed = seed
        self.samples_per_epoch = dataset_size - dataset_size % self.global_batch
        if samples_per_epoch is not None:
            if (samples_per_epoch % self.global_batch or samples_per_epoch <= 0
                    or samples_per_epoch > dataset_size):
                raise DataError(f"samples_per_epoch ({samples_per_epoch}) must be a positive "
                                f"multiple of the global batch ({self.global_batch}) and at "
                                f"most the dataset size ({dataset_size})")
            self.samples_per_epoch = samples_per_epoch
        if consumed_samples % self.global_batch:
            raise DataError(f"consumed_samples ({consumed_samples}) is not a multiple of the global "
                            f"batch ({self.global_batch}) the random sampler resumes from")

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (whole global batches only)."""
        rng = np.random.RandomState((self.seed + epoch) % (2 ** 32))
        return rng.permutation(self.dataset_size)[:self.samples_per_epoch]

    def __iter__(self) -> Iterator[List[int]]:
        epoch, offset = divmod(self.consumed_samples, self.samples_per_epoch)
        start = self.data_parallel_rank * self.micro_batch_size
        while True:
            order = self.epoch_order(epoch)
            for g in range(offset, self.samples_per_epoch, self.global_batch):
                yield order[g + start:g + start + self.micro_batch_size].tolist()
            epoch, offset = epoch + 1, 0


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int,
                                  data_parallel_rank: int, data_parallel_size: int,
                                  num_workers: int = 0, dataloader_type: str = "single",
                                  seed: int = 1234, drop_last: bool = True,
                                  samples_per_epoch: Optional[int] = None
                                  ) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with a resumable batch sampler.

    ``dataloader_type`` is ``single`` (:class:`MegatronPretrainingSampler`) or ``cyclic``
    (:class:`MegatronPretrainingRandomSampler`, with ``seed`` and ``samples_per_epoch``).
    """
    if dataloader_type == "single":
        sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                             data_parallel_rank, data_parallel_size, drop_last)
    elif dataloader_type == "cyclic":
        sampler = MegatronPretrainingRandomSampler(len(dataset), consumed_samples, micro_batch_size,
                                                   data_parallel_rank, data_parallel_size, seed,
                                                   samples_per_epoch)
    else:
        raise DataError(f"dataloader_type must be 'single' or 'cyclic', got {dataloader_type!r}")
    if num_workers < 0:
        raise DataError(f"num_workers must be non-negative, got {num_workers}")
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=num_workers > 0)


def iterate_keeping_rng(loader) -> Iterator:
    """``iter(loader)`` without moving the global torch generator: starting a DataLoader
    iterator draws a base seed from it, and that draw would shift the dropout stream of a
    resumed run against an uninterrupted one."""
    state = torch.random.get_rng_state()
    iterator = iter(loader)
    torch.random.set_rng_state(state)
    return iterator
