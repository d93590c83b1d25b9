"""GPT dataset: contiguous windows of ``seq_length + 1`` tokens over shuffled documents.

Three index arrays, built once and cached (see :mod:`.cache`):

1. ``doc_idx``: the sequence ids of the document range, once per epoch, each epoch in its
   own random order. Concatenating their tokens gives the *stream*.
2. ``sample_idx`` (C++ ``build_sample_idx``): sample k is stream tokens
   ``[k * seq_length, (k + 1) * seq_length]`` (inclusive; consecutive samples share one token,
   the last label of one is the first input of the next). Windows cross document borders.
3. ``shuffle_idx``: the order samples are served in. When the last epoch is only partly
   needed (< 80% of it), its samples are shuffled separately and served after all earlier
   epochs, so every full epoch is seen completely (Megatron's ``separate_last_epoch``).

Item i is ``{"tokens", "labels", "loss_mask"}`` (int64, int64, float32; length seq_length).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .cache import cached_index_arrays, data_fingerprint, default_cache_dir
from .errors import DataError
from .helpers import build_sample_idx
from .indexed import IndexedDataset

LAST_EPOCH_SEPARATE_THRESHOLD = 0.80


def _open(indexed: Union[str, IndexedDataset]) -> IndexedDataset:
    return IndexedDataset(indexed) if isinstance(indexed, str) else indexed


def check_document_range(indexed: IndexedDataset, document_range) -> Tuple[int, int]:
    """Validate ``(first, end)`` against the dataset; None means all documents."""
    n = indexed.num_documents
    if document_range is None:
        return 0, n
    lo, hi = int(document_range[0]), int(document_range[1])
    if not 0 <= lo <= hi <= n:
        raise DataError(f"document range [{lo}, {hi}) is outside the {n} documents of {indexed.prefix}")
    return lo, hi


class GPTDataset(torch.utils.data.Dataset):
    """Megatron-style GPT pretraining samples over documents ``[first, end)`` of an indexed dataset.

    Args:
        indexed: an :class:`IndexedDataset` or its prefix.
        document_range: ``(first, end)`` documents of this split (None: all).
        num_samples: samples to serve (None: one epoch's worth); more than one epoch repeats
            the documents in a new order.
        seq_length: tokens per sample input (each sample reads seq_length + 1 tokens).
        seed: seed of the document and sample shuffles.
        name: split name, used in cache file names and messages.
        cache_dir: where index arrays are cached (default ``index-cache/`` next to the data).
        shuffle: False keeps documents and samples in order (tests, evaluation).
        eod, eod_mask_loss: when both set, inputs equal to ``eod`` get loss_mask 0.
        group: process group whose rank 0 builds the indices (default: the world).
    """

    kind = "gpt"
    """The dataset's name in ``builder.DATASET_KINDS``."""
    needs_special_tokens = False
    """Whether the builder must pass the tokenizer's :class:`SpecialTokenIds` (after ``seed``)."""

    def __init__(self, indexed: Union[str, IndexedDataset], document_range: Optional[Tuple[int, int]],
                 num_samples: Optional[int], seq_length: int, seed: int, *, name: str = "train",
                 cache_dir: Optional[str] = None, shuffle: bool = True, eod: Optional[int] = None,
                 eod_mask_loss: bool = False, group=None, log: Optional[Callable[[str], None]] = None):
        self.indexed = _open(indexed)
        self.document_range = check_document_range(self.indexed, document_range)
        if seq_length <= 0:
            raise DataError(f"seq_length must be positive, got {seq_length}")
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.name = name
        self.shuffle = shuffle
        if eod_mask_loss and eod is None:
            raise DataError("eod_mask_loss needs the eod token id")
        self.eod, self.eod_mask_loss = eod, eod_mask_loss

        doc_indices = self.indexed.document_indices
        lo, hi = self.document_range
        self.sequence_range = (int(doc_indices[lo]), int(doc_indices[hi]))
        lengths = self.indexed.sequence_lengths
        self.tokens_per_epoch = int(lengths[self.sequence_range[0]:self.sequence_range[1]].sum(dtype=np.int64))
        if self.tokens_per_epoch < self.seq_length + 1:
            raise DataError(f"the {name} split of {self.indexed.prefix} (documents {lo}..{hi}) has "
                            f"{self.tokens_per_epoch} tokens, fewer than the {self.seq_length + 1} "
                            "one sample needs")
        per_epoch = (self.tokens_per_epoch - 1) // self.seq_length
        self.num_samples = per_epoch if num_samples is None else int(num_samples)
        if self.num_samples < 0:
            raise DataError(f"num_samples must be non-negative, got {num_samples}")
        self.num_epochs = max(1, -(-(self.num_samples * self.seq_length + 1) // self.tokens_per_epoch))

        description = {
            "class": "GPTDataset", "data": data_fingerprint(self.indexed.prefix),
            "document_range": list(self.document_range), "num_samples": self.num_samples,
            "seq_length": self.seq_length, "seed": self.seed, "shuffle": self.shuffle,
        }
        stem = os.path.basename(self.indexed.prefix)
        arrays = cached_index_arrays(
            cache_dir or default_cache_dir(self.indexed.prefix), f"{stem}-{name}-gpt", description,
            self._build_indices, keys=("doc_idx", "sample_idx", "shuffle_idx"), group=group, log=log)
        self.doc_idx = arrays["doc_idx"]
        self.sample_idx = arrays["sample_idx"]
        self.shuffle_idx = arrays["shuffle_idx"]

    def _build_indices(self) -> Dict[str, np.ndarray]:
        rng = np.random.RandomState(self.seed % (2 ** 32))
        seq_ids = np.arange(*self.sequence_range, dtype=np.int64)
        epochs = self.num_epochs
        doc_idx = np.concatenate([rng.permutation(seq_ids) if self.shuffle else seq_ids
                                  for _ in range(epochs)])
        available = (epochs * self.tokens_per_epoch - 1) // self.seq_length
        sample_idx = build_sample_idx(self.indexed.sequence_lengths, doc_idx, self.seq_length, available)
        if not self.shuffle:
            shuffle_idx = np.arange(available, dtype=np.int64)
        else:
            first = ((epochs - 1) * self.tokens_per_epoch - 1) // self.seq_length if epochs > 1 else 0
            per_epoch = (self.tokens_per_epoch - 1) // self.seq_length
            separate = epochs > 1 and (self.num_samples - first) < LAST_EPOCH_SEPARATE_THRESHOLD * per_epoch
            if separate:
                shuffle_idx = np.concatenate([rng.permutation(first),
                                              first + rng.permutation(available - first)])
            else:
                shuffle_idx = rng.permutation(available)
        shuffle_idx = np.ascontiguousarray(shuffle_idx[:self.num_samples], dtype=np.int64)
        return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}

    def __len__(self) -> int:
        return self.num_samples

    def raw_sample(self, idx: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample ``idx`` (int64)."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} is out of range for the {self.name} split ({self.num_samples} samples)")
        j = int(self.shuffle_idx[idx])
        (d0, o0), (d1, o1) = self.sample_idx[j], self.sample_idx[j + 1]
        d0, o0, d1, o1 = int(d0), int(o0), int(d1), int(o1)
        get = self.indexed.get
        if d0 == d1:
            parts = [get(int(self.doc_idx[d0]), o0, o1 - o0 + 1)]
        else:
            parts = [get(int(self.doc_idx[d0]), o0)]
            parts += [get(int(self.doc_idx[k])) for k in range(d0 + 1, d1)]
            parts.append(get(int(self.doc_idx[d1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        sample = self.raw_sample(int(idx))
        tokens = torch.from_numpy(sample[:-1].copy())
        labels = torch.from_numpy(sample[1:].copy())
        loss_mask = torch.ones(self.seq_length, dtype=torch.float32)
        if self.eod_mask_loss:
            loss_mask[tokens == self.eod] = 0.0
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
