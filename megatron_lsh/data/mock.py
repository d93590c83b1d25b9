"""Megatron's ``--mock-data``: a corpus of random-token documents for smoke runs.

The documents are written once as an ordinary ``.bin`` / ``.idx`` dataset and then read by
the same dataset classes as real data (GPT, MLM, T5), so a mock run exercises the whole
input pipeline. The content is a function of the vocabulary, the sequence length and the
seed only: every rank and every re-run sees the same corpus.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np

from megatron_lsh.data.indexed import best_fitting_dtype, dataset_exists, write_dataset

NUM_DOCUMENTS = 1000
"""Documents in a mock corpus (datasets loop over them for as many epochs as they need)."""


def mock_data_prefix(folder: Optional[str], vocab_size: int, seq_length: int, seed: int,
                     eod: Optional[int] = None) -> str:
    """The prefix of the mock corpus for these settings, written first if it does not exist.

    Documents are ``seq_length / 2 .. 2 * seq_length`` tokens drawn uniformly from
    ``[0, vocab_size)``, each closed by ``eod`` when given. ``folder``: ``--data-cache-path``,
    or the temp folder (one machine only: on several nodes give a shared cache path).
    """
    folder = folder or os.path.join(tempfile.gettempdir(), "megatron_lsh_mock_data")
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, f"mock_v{vocab_size}_s{seq_length}_seed{seed}_text_document")
    if dataset_exists(prefix):
        return prefix
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, seq_length // 2), 2 * seq_length + 1, NUM_DOCUMENTS)
    dtype = best_fitting_dtype(max(vocab_size, (eod or 0) + 1))
    documents = []
    for length in lengths:
        doc = rng.integers(0, vocab_size, int(length)).tolist()
        documents.append(doc + ([eod] if eod is not None else []))
    write_dataset(prefix, documents, dtype=dtype)   # files appear whole (written, then renamed)
    return prefix
