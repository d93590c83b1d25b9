"""Autoregressive sampling from a GPT-MoE with a KV cache.

The prompt runs through the model once (its keys and values go into an
:class:`~megatron_lsh.models.transformer.InferenceCache`); then each new token runs alone,
attending to everything cached. Token choice: greedy (argmax), or sampling at
``temperature`` from the ``top_k`` most likely tokens and/or the smallest set whose
probability reaches ``top_p`` (nucleus), with a seeded generator, so a seed repeats a
sample. Logits of vocabulary padding rows (ids the tokenizer never produces) are masked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_lsh.models.transformer import InferenceCache


@dataclass
class Sampling:
    """How the next token is chosen."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    top_p: float = 1.0
    """1.0: no nucleus cut."""
    seed: int = 0

    def __post_init__(self):
        if not self.greedy:
            if not self.temperature > 0:
                raise ValueError(f"--temperature must be positive, got {self.temperature}")
            if self.top_k < 0:
                raise ValueError(f"--top-k must be non-negative, got {self.top_k}")
            if not 0.0 < self.top_p <= 1.0:
                raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


def choose(logits_V: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token id from one position's logits."""
    if sampling.greedy:
        return int(torch.argmax(logits_V))
    logits = logits_V.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: list, max_new_tokens: int, sampling: Sampling, *,
             vocab_size: Optional[int] = None, stop_id: Optional[int] = None,
             max_positions: Optional[int] = None) -> list:
    """Token ids generated after ``prompt`` (at most ``max_new_tokens``; stops after
    ``stop_id``, or when ``max_positions`` tokens are reached). ``vocab_size``: ids at or
    above it are never chosen."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if max_positions is not None and len(prompt) >= max_positions:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model handles at most "
                         f"{max_positions} positions")
    model.eval()
    generator = torch.Generator().manual_seed(sampling.seed)
    cache = InferenceCache()
    logits = model(input_ids=torch.tensor([prompt]), cache=cache)[0]   # [s, 1, V]
    out = []
    while len(out) < max_new_tokens:
        last = logits[-1, 0]
        if vocab_size is not None and vocab_size < last.numel():
            last = last.clone()
            last[vocab_size:] = float("-inf")
        token = choose(last, sampling, generator)
        out.append(token)
        if token == stop_id or (max_positions is not None
                                and len(prompt) + len(out) >= max_positions):
            break
        logits = model(input_ids=torch.tensor([[token]]), cache=cache)[0]
    return out
