"""Contextual hidden states of real text without a trained model, to measure LSH compression.

Random vectors are the wrong input for judging LSH: they have no structure to merge. Real
hidden states repeat (the same word) and vary with context (the same word in different
sentences). This module builds such states from any text, deterministically and cheaply:

1. words and punctuation -> ids of a vocabulary built from the text itself;
2. one random Gaussian embedding per id (seeded);
3. ``layers`` rounds of fixed random causal attention over windows of ``window`` tokens
   (random query/key/value projections, a recency bias), each followed by an RMS norm,
   so every state mixes its own word with its context.

Used by the LSH tests (a Hamlet excerpt under ``tests/fixtures/moe``) and ``bench/moe_layer.py``
(the Shakespeare corpus). Not used in training.

Legend: T tokens, H hidden, D attention width.
"""
from __future__ import annotations

import math
import re

import torch

_TOKEN = re.compile(r"[A-Za-z']+|[^\sA-Za-z']")


def word_ids(text: str) -> tuple[torch.Tensor, int]:
    """Lower-cased words and punctuation marks -> (ids [T], vocabulary size)."""
    vocab: dict = {}
    ids = [vocab.setdefault(tok.lower(), len(vocab)) for tok in _TOKEN.findall(text)]
    return torch.tensor(ids, dtype=torch.int64), len(vocab)


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)


def contextual_states(ids_T: torch.Tensor, vocab_size: int, hidden_size: int, *,
                      layers: int = 2, window: int = 256, attn_dim: int = 64,
                      recency: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Hidden states ``[T, H]`` (fp32, unit RMS) of the token ids, mixed with their context."""
    gen = torch.Generator().manual_seed(seed)
    h_TH = torch.randn(vocab_size, hidden_size, generator=gen)[ids_T]
    num_tokens = ids_T.shape[0]
    for _ in range(layers):
        wq = torch.randn(hidden_size, attn_dim, generator=gen) / math.sqrt(hidden_size)
        wk = torch.randn(hidden_size, attn_dim, generator=gen) / math.sqrt(hidden_size)
        wv = torch.randn(hidden_size, hidden_size, generator=gen) / math.sqrt(hidden_size)
        mixed = torch.empty_like(h_TH)
        for start in range(0, num_tokens, window):
            x = h_TH[start:start + window]
            n = x.shape[0]
            pos = torch.arange(n)
            dist = (pos.view(-1, 1) - pos.view(1, -1)).float()
            scores = (x @ wq) @ (x @ wk).t() / math.sqrt(attn_dim) - recency * dist
            scores = scores.masked_fill(dist < 0, float("-inf"))
            mixed[start:start + n] = torch.softmax(scores, dim=-1) @ (x @ wv)
        h_TH = _rms_norm(h_TH + mixed)
    return h_TH


def text_states(text: str, hidden_size: int, num_tokens: int = None, **kwargs) -> torch.Tensor:
    """Contextual states of the first ``num_tokens`` tokens of ``text`` (all when None)."""
    ids_T, vocab = word_ids(text)
    if num_tokens is not None:
        if ids_T.shape[0] < num_tokens:
            raise ValueError(f"the text has {ids_T.shape[0]} tokens, {num_tokens} requested")
        ids_T = ids_T[:num_tokens]
    return contextual_states(ids_T, vocab, hidden_size, **kwargs)
