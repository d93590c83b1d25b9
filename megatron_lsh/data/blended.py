"""Weighted blending of several datasets into one (Megatron's ``BlendedDataset``).

Sample i comes from the dataset whose share so far lags most behind its weight (the greedy
C++ ``build_blending_indices``), so every prefix of the blend is as close to the weights as
integers allow, and the order is deterministic (no seed needed). The indices are cheap, so
every rank computes them itself (no cache, no collective).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import torch

from .errors import DataError
from .helpers import build_blending_indices

# Constituent datasets get this much more than their exact share, so rounding never runs short.
SAMPLE_MARGIN = 0.005


def normalize_weights(weights: Sequence[float]) -> List[float]:
    """Weights scaled to sum to 1 (checked non-negative with a positive sum)."""
    w = [float(x) for x in weights]
    if not w or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise DataError(f"blending weights must be non-negative numbers with a positive sum, got {list(weights)}")
    total = sum(w)
    return [x / total for x in w]


def blended_sample_counts(weights: Sequence[float], size: int) -> List[int]:
    """Samples each constituent must provide for a blend of ``size`` (with a 0.5% margin)."""
    return [int(math.ceil(w * size * (1 + SAMPLE_MARGIN))) for w in normalize_weights(weights)]


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, name: str = "train"):
        if len(datasets) != len(weights):
            raise DataError(f"{len(datasets)} datasets but {len(weights)} weights for the {name} blend")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        self.name = name
        self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, self.size)
        for d, ds in enumerate(self.datasets):
            taken = self.dataset_sample_index[self.dataset_index == d]
            needed = int(taken.max()) + 1 if len(taken) else 0
            if needed > len(ds):
                raise DataError(f"dataset {d} of the {name} blend has {len(ds)} samples but the "
                                f"blend of {self.size} needs {needed}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} is out of range for the {self.name} blend ({self.size} samples)")
        d = int(self.dataset_index[idx])
        return self.datasets[d][int(self.dataset_sample_index[idx])]

    def counts(self) -> np.ndarray:
        """Samples taken from each dataset."""
        return np.bincount(self.dataset_index.astype(np.int64), minlength=len(self.datasets))
