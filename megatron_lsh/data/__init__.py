"""Data pipeline: Megatron ``.bin``/``.idx`` datasets, index helpers, GPT / MLM / T5 datasets,
blending, splits and resumable samplers.

Importing the package is cheap; the names below load their module on first use.

- ``indexed``: :class:`IndexedDataset` (reader), :class:`IndexedDatasetWriter`, ``merge_datasets``
- ``gpt_dataset`` / ``mlm_dataset`` / ``t5_dataset``: :class:`GPTDataset`, :class:`MLMDataset`,
  :class:`T5Dataset`; ``blended``: :class:`BlendedDataset`
- ``builder``: ``build_train_valid_test_datasets``, ``parse_data_path``, ``split_document_ranges``
- ``sampler``: :class:`MegatronPretrainingSampler`, :class:`MegatronPretrainingRandomSampler`,
  ``build_pretraining_data_loader``
"""
from __future__ import annotations

import importlib

from .errors import DataError

_EXPORTS = {
    "IndexedDataset": "indexed", "IndexedDatasetWriter": "indexed", "merge_datasets": "indexed",
    "write_dataset": "indexed", "best_fitting_dtype": "indexed",
    "GPTDataset": "gpt_dataset", "MLMDataset": "mlm_dataset", "T5Dataset": "t5_dataset",
    "BlendedDataset": "blended", "SpecialTokenIds": "special_tokens",
    "build_train_valid_test_datasets": "builder", "parse_data_path": "builder",
    "parse_split": "builder", "split_document_ranges": "builder",
    "MegatronPretrainingSampler": "sampler", "MegatronPretrainingRandomSampler": "sampler",
    "build_pretraining_data_loader": "sampler",
}

__all__ = ["DataError", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
