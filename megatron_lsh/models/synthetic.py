"""Synthetic micro-batches for every model kind: random tokens shaped like the real datasets.

For benchmarks, tests and smoke runs that should not depend on a corpus. Each model class
draws its own batch (``synthetic_batch`` of :class:`~megatron_lsh.models.base.StageModel`
subclasses); the keys are the model's forward arguments plus ``loss_mask``.
"""
from __future__ import annotations

import torch

from megatron_lsh.config import ModelConfig
from megatron_lsh.models.registry import MODEL_CLASSES


def synthetic_batch(kind: str, config: ModelConfig, batch: int, seed: int) -> dict:
    """Random tokens for model ``kind`` ('gpt', 'roberta', 't5'): model inputs plus
    ``loss_mask``, the same for the same ``seed``."""
    if kind not in MODEL_CLASSES:
        raise ValueError(f"model kind must be one of {sorted(MODEL_CLASSES)}, got {kind!r}")
    return MODEL_CLASSES[kind].synthetic_batch(config, batch, torch.Generator().manual_seed(seed))
