"""From Megatron-style data arguments to train / valid / test datasets.

- ``--data-path a`` or ``--data-path 0.7 a 0.3 b``: one prefix, or weighted prefixes that are
  blended; each prefix's documents are cut into train / valid / test by ``--split 949,50,1``
  (whole documents, in file order).
- ``--train-data-path`` / ``--valid-data-path`` / ``--test-data-path``: separate prefixes
  (each used whole) per split, e.g. the train / valid files of ``tools/prepare_corpus.py``.

The dataset is given as a class (or its name in ``DATASET_KINDS``). Every dataset class is
built as ``cls(prefix, document_range, num_samples, seq_length, seed[, special], name=...,
cache_dir=..., group=..., log=..., **dataset_kwargs)``; ``special`` (the tokenizer's special
token ids) is passed when the class sets ``needs_special_tokens``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Type, Union

from .blended import BlendedDataset, blended_sample_counts
from .errors import DataError
from .gpt_dataset import GPTDataset
from .indexed import IndexedDataset
from .mlm_dataset import MLMDataset
from .special_tokens import SpecialTokenIds
from .t5_dataset import T5Dataset

SPLIT_NAMES = ("train", "valid", "test")
DATASET_KINDS = {cls.kind: cls for cls in (GPTDataset, MLMDataset, T5Dataset)}
"""Dataset classes by name (``gpt``, ``mlm``, ``t5``), for callers that name the kind."""


def parse_split(split: Union[str, Sequence[float]]) -> List[float]:
    """``"949,50,1"`` (or ``"98/2"``, or numbers) -> three weights summing to 1."""
    if isinstance(split, str):
        parts = [p.strip() for p in split.replace("/", ",").split(",") if p.strip()]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise DataError(f"split must be up to three comma-separated numbers like '949,50,1', got {split!r}") from None
    else:
        weights = [float(x) for x in split]
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"split must be one to three non-negative weights with a positive sum, got {split!r}")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_document_ranges(split: Union[str, Sequence[float]], num_documents: int) -> List[Tuple[int, int]]:
    """Three ``[first, end)`` document ranges covering ``num_documents`` by the split weights."""
    weights = parse_split(split)
    bounds, acc = [0], 0.0
    for w in weights:
        acc += w
        bounds.append(int(round(acc * num_documents)))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def parse_data_path(data_path: Union[str, Sequence[str]]
                    ) -> Tuple[List[str], Optional[List[float]]]:
    """``['a']`` -> (['a'], [1.0]); ``['0.7', 'a', '0.3', 'b']`` -> (['a', 'b'], [0.7, 0.3]).

    Several prefixes without weights give weights None: the builder blends them in proportion
    to their tokens (as Megatron blends unweighted prefixes by size).
    """
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    if not items:
        raise DataError("data path is empty: give a dataset prefix, or 'weight prefix' pairs")

    def number(s: str) -> Optional[float]:
        try:
            return float(s)
        except ValueError:
            return None

    if number(items[0]) is None:
        return items, ([1.0] if len(items) == 1 else None)
    if len(items) % 2:
        raise DataError(f"data path {' '.join(items)!r} must alternate weights and prefixes")
    weights = [number(w) for w in items[0::2]]
    if any(w is None or w < 0 for w in weights):
        raise DataError(f"data path {' '.join(items)!r} has a weight that is not a non-negative number")
    return items[1::2], weights


def _make(cls, prefix, document_range, num_samples, name, *, seq_length, seed, special,
          cache_dir, group, log, kwargs):
    args = (prefix, document_range, num_samples, seq_length, seed)
    if getattr(cls, "needs_special_tokens", False):
        if special is None:
            raise DataError(f"{getattr(cls, 'kind', cls.__name__)} datasets need the tokenizer's "
                            f"special token ids (special=)")
        args += (special,)
    return cls(*args, name=name, cache_dir=cache_dir, group=group, log=log, **kwargs)


def dataset_class(kind: Union[str, Type]) -> Type:
    """The dataset class of ``kind``: a class is returned as is, a name looked up in
    ``DATASET_KINDS``."""
    if not isinstance(kind, str):
        return kind
    if kind not in DATASET_KINDS:
        raise DataError(f"dataset kind {kind!r} is not one of {', '.join(DATASET_KINDS)}")
    return DATASET_KINDS[kind]


def _tokens_in(prefix: str, document_range: Optional[Tuple[int, int]]) -> float:
    """Tokens of ``prefix`` within ``document_range`` (all of it when None)."""
    indexed = IndexedDataset(prefix)
    lo, hi = document_range or (0, indexed.num_documents)
    doc_index = indexed.document_indices
    first, last = int(doc_index[lo]), int(doc_index[hi])
    return float(indexed.sequence_lengths[first:last].sum())


def build_train_valid_test_datasets(kind: Union[str, Type], *, seq_length: int, seed: int,
                                    num_samples: Sequence[Optional[int]],
                                    data_path: Optional[Sequence[str]] = None,
                                    split: Union[str, Sequence[float]] = "949,50,1",
                                    train_data_path: Optional[Sequence[str]] = None,
                                    valid_data_path: Optional[Sequence[str]] = None,
                                    test_data_path: Optional[Sequence[str]] = None,
                                    special: Optional[SpecialTokenIds] = None,
                                    cache_dir: Optional[str] = None, group=None,
                                    log: Optional[Callable[[str], None]] = None, **dataset_kwargs):
    """(train, valid, test) datasets of ``kind`` (a dataset class, or ``gpt``, ``mlm``, ``t5``);
    None where a split has no samples requested or no documents.

    ``num_samples`` is (train, valid, test) sample counts (None: one epoch; not allowed for
    blends). ``dataset_kwargs`` go to the dataset class (e.g. ``mask_prob``,
    ``decoder_seq_length``, ``eod``/``eod_mask_loss``).
    """
    cls = dataset_class(kind)
    if len(num_samples) != 3:
        raise DataError(f"num_samples must give (train, valid, test) counts, got {list(num_samples)}")
    opts = dict(seq_length=seq_length, seed=seed, special=special, cache_dir=cache_dir,
                group=group, log=log, kwargs=dataset_kwargs)
    per_split_paths = (train_data_path, valid_data_path, test_data_path)
    if data_path and any(per_split_paths):
        raise DataError("give either data_path (cut by split) or train/valid/test data paths, not both")
    if not data_path and not any(per_split_paths):
        raise DataError("no data: give data_path or train_data_path")

    results = []
    for i, name in enumerate(SPLIT_NAMES):
        n = num_samples[i]
        if n is not None and n <= 0:
            results.append(None)
            continue
        if data_path:
            prefixes, weights = parse_data_path(data_path)
            ranges = []
            for prefix in prefixes:
                indexed = IndexedDataset(prefix)
                ranges.append(split_document_ranges(split, indexed.num_documents)[i])
            if all(lo == hi for lo, hi in ranges):
                results.append(None)
                continue
        else:
            paths = per_split_paths[i]
            if not paths:
                results.append(None)
                continue
            prefixes, weights = parse_data_path(paths)
            ranges = [None] * len(prefixes)
        if len(prefixes) == 1:
            results.append(_make(cls, prefixes[0], ranges[0], n, name, **opts))
            continue
        if weights is None:
            weights = [_tokens_in(p, r) for p, r in zip(prefixes, ranges)]
            if log is not None:
                log(f" > {name}: unweighted blend, by tokens: "
                    + ", ".join(f"{p} {w / sum(weights):.3f}" for p, w in zip(prefixes, weights)))
        if n is None:
            raise DataError(f"the {name} blend of {len(prefixes)} datasets needs a sample count")
        counts = blended_sample_counts(weights, n)
        parts = [_make(cls, p, r, c, name, **opts) for p, r, c in zip(prefixes, ranges, counts)]
        results.append(BlendedDataset(parts, weights, n, name=name))
    return tuple(results)
