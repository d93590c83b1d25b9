"""Input embeddings and the (tied) output layer shared by GPT, RoBERTa and T5.

The word embedding is split over TP ranks by vocabulary; learned positions (when configured)
are replicated.
When the output layer is tied to the word embedding and the two live on different pipeline
stages, the last stage holds its own copy: both are marked ``shared_embedding`` and their
gradients are summed over the embedding group (first + last stage) every step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lsh.config import ModelConfig
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.layers import (VocabParallelEmbedding, init_method_normal,
                                          parallel_lm_logits, vocab_parallel_cross_entropy)
from megatron_lsh.parallel.mappings import scatter_to_sequence_parallel_region
from megatron_lsh.parallel.random import get_rng_tracker, seeded


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of lcm(divisible_by, tp).

    Megatron pads to ``divisible_by * tp``, which makes the model's shape depend on the TP
    size; the lcm keeps it layout-independent (equal to Megatron's for the usual powers of 2
    with tp <= divisible_by) so every layout trains the very same model.
    """
    multiple = divisible_by * tp // math.gcd(divisible_by, tp)
    return ((vocab_size + multiple - 1) // multiple) * multiple


class Embedding(nn.Module):
    """Word (vocab-parallel) + learned position embeddings (unless the positions are RoPE or
    none), then dropout; returns [s, b, h]."""

    def __init__(self, config: ModelConfig, groups: ProcessGroups, *, seed: int,
                 max_positions: int, sequence_parallel: bool = False, device=None):
        super().__init__()
        self.groups = groups
        self.sequence_parallel = sequence_parallel
        self.dropout = config.hidden_dropout
        self.vocab_size = padded_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by,
                                            groups.tp_size)
        init = init_method_normal(config.init_method_std)
        with seeded(seed):
            self.word_embeddings = VocabParallelEmbedding(self.vocab_size, config.hidden_size,
                                                          tp_group=groups.tp, init_method=init,
                                                          device=device)
        self.position_embeddings = None
        if config.uses_learned_positions:  # RoPE rotates q and k inside attention instead
            with seeded(seed + 1):
                self.position_embeddings = nn.Embedding(max_positions, config.hidden_size,
                                                        device=device)
                if self.position_embeddings.weight.device.type != "meta":
                    init(self.position_embeddings.weight)

    def forward(self, input_ids_bs: torch.Tensor,
                position_ids_bs: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.word_embeddings(input_ids_bs)
        if self.position_embeddings is not None:
            if position_ids_bs is None:
                position_ids_bs = torch.arange(input_ids_bs.shape[1], device=input_ids_bs.device)
                position_ids_bs = position_ids_bs.unsqueeze(0).expand_as(input_ids_bs)
            x = x + self.position_embeddings(position_ids_bs)
        x = x.transpose(0, 1).contiguous()  # [s, b, h]
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, self.groups.tp)
            if self.training and self.dropout > 0:
                with get_rng_tracker().fork():
                    return F.dropout(x, self.dropout, True)
            return x
        return F.dropout(x, self.dropout, self.training)


class OutputLayer(nn.Module):
    """Vocab-parallel logits and per-token cross entropy, tied to the word embedding or not.

    ``weight`` comes from the embedding on the same stage (tied, pp = 1 or first == last),
    or is a copy owned here (tied across stages: marked ``shared_embedding``; or untied).
    """

    def __init__(self, config: ModelConfig, groups: ProcessGroups, *, seed: int,
                 tied_weight: Optional[nn.Parameter], sequence_parallel: bool = False,
                 bias: bool = False, device=None):
        super().__init__()
        self.groups = groups
        self.sequence_parallel = sequence_parallel
        self.tied_weight = [tied_weight]  # a list so it is not registered twice
        self.weight = None
        vocab = padded_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by,
                                  groups.tp_size)
        if tied_weight is None:
            # Same seed as the embedding when tied across stages: both copies start equal.
            with seeded(seed):
                table = VocabParallelEmbedding(vocab, config.hidden_size, tp_group=groups.tp,
                                               init_method=init_method_normal(
                                                   config.init_method_std), device=device)
            self.weight = table.weight
        self.bias = None
        if bias:  # RoBERTa / T5 heads: a vocab-parallel output bias, zero-initialised.
            self.bias = nn.Parameter(torch.zeros(vocab // groups.tp_size, device=device))
            self.bias.tensor_model_parallel = True
            self.bias.partition_dim = 0
            self.bias.partition_stride = 1

    def logits(self, x_sbh: torch.Tensor) -> torch.Tensor:
        """[s, b, h] (or [s/tp, b, h] with sequence parallelism) -> [s, b, V/tp]."""
        weight = self.weight if self.weight is not None else self.tied_weight[0]
        return parallel_lm_logits(x_sbh, weight, self.groups.tp,
                                  sequence_parallel=self.sequence_parallel, bias=self.bias)

    def forward(self, x_sbh: torch.Tensor, labels_bs: Optional[torch.Tensor] = None):
        """Logits [s, b, V/tp] without labels; per-token loss [b, s] with them."""
        logits = self.logits(x_sbh)
        if labels_bs is None:
            return logits
        loss_sb = vocab_parallel_cross_entropy(logits.float(), labels_bs.transpose(0, 1),
                                               self.groups.tp)
        return loss_sb.transpose(0, 1).contiguous()


def mark_shared_embedding(param: nn.Parameter, groups: ProcessGroups) -> None:
    """Tag an embedding copy whose gradient is summed over the first and last stage.

    ``shared_embedding``: the pipeline sums its gradient over the embedding group.
    ``shared``: a copy held off the first stage; the grad norm skips it (counted once).
    """
    if groups.pp_size > 1:
        param.shared_embedding = True
        param.shared = not groups.is_first_stage


def first_stage_embedding(config: ModelConfig, groups: ProcessGroups, *, seed: int, tied: bool,
                          sequence_parallel: bool = False, device=None) -> Optional[Embedding]:
    """The input embedding of a decoder- or encoder-only model on its first stage, else None.

    With a tied output layer the word embedding is marked as shared across stages.
    """
    if not groups.is_first_stage:
        return None
    embedding = Embedding(config, groups, seed=seed,
                          max_positions=config.max_position_embeddings,
                          sequence_parallel=sequence_parallel, device=device)
    if tied:
        mark_shared_embedding(embedding.word_embeddings.weight, groups)
    return embedding
