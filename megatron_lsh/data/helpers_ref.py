"""Pure Python / numpy references of the C++ index builders in ``helpers.cpp``.

They define the contracts (the C++ code must return identical arrays) and serve as the
fallback when the extension is not built. ``build_sample_idx`` here is vectorised with
``searchsorted`` (a different algorithm from the C++ walk, which makes the cross-check
meaningful); the other two are plain loops.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

_MASK64 = (1 << 64) - 1


class SplitMix64:
    """The SplitMix64 generator, bit-identical to the one in helpers.cpp."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next(self) -> int:
        """Next 64-bit output."""
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def uniform(self) -> float:
        """Uniform double in [0, 1) from the top 53 bits."""
        return (self.next() >> 11) * (1.0 / 9007199254740992.0)


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int,
                     num_samples: int) -> np.ndarray:
    """Rows k = 0..num_samples: (doc_idx position, offset) of stream token k * seq_length.

    The stream is the concatenation of sequences ``doc_idx[0], doc_idx[1], ...``; sample k
    spans rows k..k+1 inclusive (seq_length + 1 tokens).
    """
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(doc_idx, dtype=np.int64)]
    ends = np.cumsum(lengths)
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if num_samples >= 0 and (len(ends) == 0 or positions[-1] >= ends[-1]):
        raise ValueError("the documents hold fewer tokens than num_samples * seq_length + 1")
    ptr = np.searchsorted(ends, positions, side="right")
    offsets = positions - (ends[ptr] - lengths[ptr])
    return np.stack([ptr, offsets], axis=1).astype(np.int64)


def build_blending_indices(weights: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Greedy blending: sample i goes to argmax_d (w_d * (i + 1) - taken_d), first on ties."""
    w = [float(x) for x in weights]
    taken = [0] * len(w)
    dataset_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    for i in range(size):
        step = float(i + 1)
        best, best_err = 0, w[0] * step - float(taken[0])
        for j in range(1, len(w)):
            err = w[j] * step - float(taken[j])
            if err > best_err:
                best, best_err = j, err
        dataset_index[i] = best
        sample_index[i] = taken[best]
        taken[best] += 1
    return dataset_index, sample_index


def build_mapping(doc_bounds: np.ndarray, sizes: np.ndarray, max_seq_length: int,
                  num_epochs: int, max_num_samples: int, short_seq_prob: float, seed: int,
                  cross_documents: bool) -> np.ndarray:
    """Sentence-span mapping (first sentence, end sentence, target length); see helpers.cpp."""
    bounds = [int(x) for x in doc_bounds]
    lengths = np.asarray(sizes)
    rng = SplitMix64(seed)

    def draw() -> int:
        if short_seq_prob > 0.0 and rng.uniform() < short_seq_prob:
            return 2 + rng.next() % (max_seq_length - 1)
        return max_seq_length

    rows = []
    full = max_num_samples == 0
    for _ in range(num_epochs):
        if full:
            break
        before = len(rows)
        start, length, target = -1, 0, draw()

        def emit(end: int) -> None:
            nonlocal target, full
            rows.append((start, end, target))
            if 0 <= max_num_samples <= len(rows):
                full = True
            target = draw()

        for d in range(len(bounds) - 1):
            if full:
                break
            lo, hi = bounds[d], bounds[d + 1]
            for i in range(lo, hi):
                if full:
                    break
                n = int(lengths[i])
                if start < 0:
                    start, length = i, n
                    continue
                extra = 1 if i == lo else 0
                if length + extra + n <= target:
                    length += extra + n
                else:
                    emit(i)
                    start, length = i, n
            if not cross_documents and start >= 0 and not full:
                emit(hi)
                start, length = -1, 0
        if start >= 0 and not full:
            emit(bounds[-1])
        if len(rows) == before:
            break
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)
