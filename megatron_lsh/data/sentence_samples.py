"""Samples made of whole consecutive sentences (the shared base of the MLM and T5 datasets).

The data is a sentence-level indexed dataset (``preprocess_data.py --split-sentences``: one
sequence per sentence, documents group sentences); a document-level dataset also works, each
document then counting as one long "sentence" that gets truncated.

The C++ ``build_mapping`` packs consecutive sentences into samples up to a token budget
(RoBERTa's FULL-SENTENCES: samples may continue into the next document, with a ``sep``
between the two; ``cross_documents=False`` keeps each sample inside one document). The
mapping is built per epoch until enough samples exist, then shuffled, and cached.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from .cache import cached_index_arrays, data_fingerprint, default_cache_dir
from .errors import DataError
from .gpt_dataset import _open, check_document_range
from .helpers import build_mapping
from .indexed import IndexedDataset

MAX_EPOCHS = 1_000_000


class SentenceSpanSamples(torch.utils.data.Dataset):
    """Index of sentence-span samples; subclasses turn :meth:`content` into model inputs.

    Args:
        indexed, document_range, num_samples, seed, name, cache_dir, group: as for GPTDataset
            (num_samples None: one pass over the documents).
        budget: token budget of a sample's content (sentences plus document separators).
        separator: id inserted between documents inside a sample.
        short_seq_prob: probability that a sample's budget is drawn uniformly from [2, budget].
        cross_documents: let samples continue into the next document.
    """

    kind = "sentences"

    def __init__(self, indexed: Union[str, IndexedDataset], document_range: Optional[Tuple[int, int]],
                 num_samples: Optional[int], budget: int, seed: int, separator: int, *,
                 name: str = "train", short_seq_prob: float = 0.0, cross_documents: bool = True,
                 cache_dir: Optional[str] = None, group=None, log: Optional[Callable[[str], None]] = None):
        self.indexed = _open(indexed)
        self.document_range = check_document_range(self.indexed, document_range)
        if budget < 2:
            raise DataError(f"the {name} sample budget must be at least 2 tokens, got {budget}")
        self.budget = int(budget)
        self.seed = int(seed)
        self.name = name
        self.separator = int(separator)
        self.short_seq_prob = float(short_seq_prob)
        self.cross_documents = bool(cross_documents)
        if num_samples is not None and num_samples < 0:
            raise DataError(f"num_samples must be non-negative, got {num_samples}")
        self._requested = num_samples
        lo, hi = self.document_range
        self._doc_bounds = np.asarray(self.indexed.document_indices[lo:hi + 1], dtype=np.int64)
        if self._doc_bounds[-1] == self._doc_bounds[0]:
            raise DataError(f"the {name} split of {self.indexed.prefix} (documents {lo}..{hi}) "
                            "has no sentences")
        n_seq = int(self._doc_bounds[-1] - self._doc_bounds[0])
        mean = self.indexed.sequence_lengths[self._doc_bounds[0]:self._doc_bounds[-1]].mean()
        if n_seq == hi - lo and mean > 2 * self.budget:
            warnings.warn(f"{self.indexed.prefix} looks document-level (one sequence per document, "
                          f"{mean:.0f} tokens on average): each sample keeps only the first "
                          f"{self.budget} tokens of a document; preprocess with --split-sentences",
                          RuntimeWarning, stacklevel=3)
        description = {
            "class": type(self).__name__, "data": data_fingerprint(self.indexed.prefix),
            "document_range": list(self.document_range), "num_samples": num_samples,
            "budget": self.budget, "seed": self.seed, "short_seq_prob": self.short_seq_prob,
            "cross_documents": self.cross_documents,
        }
        stem = os.path.basename(self.indexed.prefix)
        arrays = cached_index_arrays(
            cache_dir or default_cache_dir(self.indexed.prefix), f"{stem}-{name}-{self.kind}",
            description, self._build_mapping, keys=("mapping",), group=group, log=log)
        self.mapping = arrays["mapping"]
        self.num_samples = len(self.mapping)

    def _build_mapping(self):
        limit = -1 if self._requested is None else self._requested
        epochs = 1 if self._requested is None else MAX_EPOCHS
        mapping = build_mapping(self._doc_bounds, self.indexed.sequence_lengths, self.budget,
                                epochs, limit, self.short_seq_prob, self.seed, self.cross_documents)
        rng = np.random.RandomState((self.seed + 1) % (2 ** 32))
        return {"mapping": np.ascontiguousarray(mapping[rng.permutation(len(mapping))])}

    def __len__(self) -> int:
        return self.num_samples

    def content(self, idx: int) -> np.ndarray:
        """Sample ``idx``'s tokens: its sentences with a separator at each document border,
        truncated to the sample's target length (int64)."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} is out of range for the {self.name} split ({self.num_samples} samples)")
        start, end, target = (int(x) for x in self.mapping[idx])
        doc_starts = self.indexed.document_indices
        parts = []
        for s in range(start, end):
            if s > start and self.cross_documents:
                # a sentence that begins a document gets a separator before it
                d = int(np.searchsorted(doc_starts, s, side="right")) - 1
                if int(doc_starts[d]) == s:
                    parts.append(np.asarray([self.separator], dtype=np.int64))
            parts.append(self.indexed.get(s).astype(np.int64))
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return tokens[:min(target, self.budget)]

    def sample_rng(self, idx: int) -> np.random.Generator:
        """A generator seeded by (seed, idx): the same sample is always corrupted the same way,
        while each epoch's copy of a sentence span (a different idx) gets a new corruption."""
        return np.random.default_rng([self.seed % (2 ** 63), int(idx)])
