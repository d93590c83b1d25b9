"""Checks of preprocessed data against the model, before training starts.

A dataset preprocessed with another tokenizer holds token ids the model's embedding does not
have; without a check the run dies later with an ``IndexError`` from deep inside the embedding
(or, on a GPU, a device-side assert). :func:`check_token_ids` finds the largest id of each
``.bin`` once, cheaply: not at all when the file's dtype cannot hold an id as large as the
vocabulary, else one streamed ``max`` over the memory-mapped tokens, remembered in a small JSON
file keyed by the file's size and modification time, so later runs skip the scan.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterable, Optional

import numpy as np

from .errors import DataError
from .indexed import IndexedDataset, bin_path

_BLOCK = 1 << 26   # tokens per chunk of the scan (128 MiB of uint16)


def _cache_file(prefix: str, cache_dir: Optional[str]) -> str:
    path = os.path.abspath(bin_path(prefix))
    stat = os.stat(path)
    key = hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir or os.path.dirname(path)
    return os.path.join(folder, f"{os.path.basename(prefix)}-{key}-max_token_id.json")


def max_token_id(prefix: str, cache_dir: Optional[str] = None) -> Optional[int]:
    """The largest token id in ``{prefix}.bin`` (None for an empty dataset), cached on disk."""
    cache = _cache_file(prefix, cache_dir)
    try:
        with open(cache) as f:
            return json.load(f)["max_token_id"]
    except (OSError, ValueError, KeyError):
        pass
    tokens = np.memmap(bin_path(prefix), dtype=IndexedDataset(prefix).dtype, mode="r")
    largest = None
    for start in range(0, len(tokens), _BLOCK):
        block_max = int(tokens[start:start + _BLOCK].max())
        largest = block_max if largest is None else max(largest, block_max)
    try:
        tmp = f"{cache}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"max_token_id": largest}, f)
        os.replace(tmp, cache)
    except OSError:
        pass   # a read-only data folder: scan again next time
    return largest


def check_token_ids(prefixes: Iterable[str], vocab_size: int, cache_dir: Optional[str] = None,
                    log: Optional[Callable[[str], None]] = None) -> None:
    """Raise :class:`DataError` if a dataset is empty or holds an id >= ``vocab_size``."""
    for prefix in dict.fromkeys(prefixes):
        dataset = IndexedDataset(prefix)
        if len(dataset) == 0 or int(np.sum(dataset.sequence_lengths)) == 0:
            raise DataError(f"dataset {prefix} holds no tokens: preprocess a non-empty corpus")
        info = np.iinfo(dataset.dtype) if np.issubdtype(dataset.dtype, np.integer) else None
        if info is not None and info.max < vocab_size:
            continue   # the dtype cannot hold an id as large as the vocabulary
        largest = max_token_id(prefix, cache_dir)
        if largest is not None and largest >= vocab_size:
            raise DataError(f"dataset {bin_path(prefix)} holds token id {largest} but the "
                            f"vocabulary has {vocab_size} tokens (ids 0..{vocab_size - 1}): it "
                            f"was preprocessed with another tokenizer, or --vocab-size is too "
                            f"small")
        if log is not None:
            log(f"> checked {prefix}: token ids up to {largest} fit the vocabulary of "
                f"{vocab_size}")
