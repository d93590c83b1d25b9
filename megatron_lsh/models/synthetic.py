"""Synthetic micro-batches for every model kind: random tokens shaped like the real datasets.

For benchmarks, tests and smoke runs that should not depend on a corpus. The keys match
the models' forward arguments plus ``loss_mask`` (RoBERTa: 15% masked positions, the first
always among them so the loss never has zero tokens).
"""
from __future__ import annotations

import torch

from megatron_lsh.config import ModelConfig


def synthetic_batch(kind: str, config: ModelConfig, batch: int, seed: int) -> dict:
    """Random tokens for ``kind`` ('gpt', 'roberta', 't5'): model inputs plus ``loss_mask``."""
    g = torch.Generator().manual_seed(seed)
    s, v = config.seq_length, config.vocab_size
    if kind == "gpt":
        tokens = torch.randint(0, v, (batch, s + 1), generator=g)
        return dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(batch, s))
    if kind == "roberta":
        tokens = torch.randint(1, v, (batch, s), generator=g)
        masked = torch.rand(batch, s, generator=g) < 0.15
        masked[:, 0] = True
        return dict(input_ids=torch.where(masked, torch.zeros_like(tokens), tokens),
                    padding_mask=torch.ones(batch, s, dtype=torch.bool), labels=tokens,
                    loss_mask=masked.float())
    if kind != "t5":
        raise ValueError(f"model kind must be 'gpt', 'roberta' or 't5', got {kind!r}")
    sd = config.decoder_seq_length
    labels = torch.randint(1, v, (batch, sd), generator=g)
    return dict(encoder_input_ids=torch.randint(1, v, (batch, s), generator=g),
                encoder_padding_mask=torch.ones(batch, s, dtype=torch.bool),
                decoder_input_ids=torch.cat([torch.zeros(batch, 1, dtype=torch.long),
                                             labels[:, :-1]], dim=1),
                labels=labels, loss_mask=torch.ones(batch, sd))
