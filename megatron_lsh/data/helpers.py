"""Index builders: the compiled ``_helpers`` extension when built, else the Python references.

Build the extension with ``python setup.py build_ext --inplace`` (or ``pip install -e .``).
The wrappers validate their inputs and convert dtypes, so both back ends see the same arrays.
"""
from __future__ import annotations

import warnings
from typing import Sequence, Tuple

import numpy as np

from . import helpers_ref
from .errors import DataError

try:
    from . import _helpers as _compiled
except ImportError:  # not built: the references are correct, only slower
    _compiled = None

_warned = False


def compiled_helpers_available() -> bool:
    """True when the C++ extension ``megatron_lsh.data._helpers`` is importable."""
    return _compiled is not None


def _backend(use_compiled):
    global _warned
    if use_compiled is None:
        use_compiled = _compiled is not None
    if use_compiled and _compiled is None:
        raise DataError("the C++ helpers are not built: run `python setup.py build_ext --inplace`")
    if not use_compiled and _compiled is None and not _warned:
        warnings.warn("megatron_lsh.data._helpers is not built; using the slower Python index "
                      "builders (python setup.py build_ext --inplace)", RuntimeWarning, stacklevel=3)
        _warned = True
    return _compiled if use_compiled else helpers_ref


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int,
                     use_compiled=None) -> np.ndarray:
    """GPT sample index, shape (num_samples + 1, 2): (doc_idx position, token offset) rows.

    Sample k covers the seq_length + 1 stream tokens from row k to row k+1 inclusive.
    """
    if seq_length <= 0:
        raise DataError(f"seq_length must be positive, got {seq_length}")
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    doc_idx = np.ascontiguousarray(doc_idx, dtype=np.int64)
    total = int(sizes[doc_idx].sum(dtype=np.int64)) if len(doc_idx) else 0
    available = (total - 1) // seq_length if total > 0 else 0
    if num_samples < 0 or num_samples > available:
        raise DataError(f"cannot cut {num_samples} samples of {seq_length} + 1 tokens from "
                        f"{total} tokens (at most {available})")
    return _backend(use_compiled).build_sample_idx(sizes, doc_idx, int(seq_length), int(num_samples))


def build_blending_indices(weights: Sequence[float], size: int,
                           use_compiled=None) -> Tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16, dataset_sample_index int64) of length ``size`` for normalized weights."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError(f"blending weights must be non-negative numbers with a positive sum, got {list(weights)}")
    if len(w) > 32767:
        raise DataError(f"at most 32767 datasets can be blended, got {len(w)}")
    if size < 0:
        raise DataError(f"blending size must be non-negative, got {size}")
    w = np.ascontiguousarray(w / w.sum())
    return _backend(use_compiled).build_blending_indices(w, int(size))


def build_mapping(doc_bounds: np.ndarray, sizes: np.ndarray, max_seq_length: int,
                  num_epochs: int, max_num_samples: int, short_seq_prob: float, seed: int,
                  cross_documents: bool = True, use_compiled=None) -> np.ndarray:
    """Sentence-span mapping for MLM / T5: (n, 3) rows of (first sentence, end, target length).

    ``max_num_samples < 0`` means no limit (all ``num_epochs``).
    """
    if max_seq_length < 2:
        raise DataError(f"max_seq_length must be at least 2, got {max_seq_length}")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise DataError(f"short_seq_prob must be in [0, 1], got {short_seq_prob}")
    if num_epochs < 0:
        raise DataError(f"num_epochs must be non-negative, got {num_epochs}")
    doc_bounds = np.ascontiguousarray(doc_bounds, dtype=np.int64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    if len(doc_bounds) < 1:
        raise DataError("doc_bounds needs at least one entry")
    if np.any(np.diff(doc_bounds) < 0) or doc_bounds[0] < 0 or doc_bounds[-1] > len(sizes):
        raise DataError("doc_bounds must be non-decreasing sentence indices within sizes")
    return _backend(use_compiled).build_mapping(
        doc_bounds, sizes, int(max_seq_length), int(num_epochs), int(max_num_samples),
        float(short_seq_prob), int(seed) & ((1 << 64) - 1), bool(cross_documents))
