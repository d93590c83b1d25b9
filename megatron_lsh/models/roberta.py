"""RoBERTa-MoE: a bidirectional encoder with a masked-language-model head (no next-sentence task).

One ``RobertaModel`` object is one pipeline stage (see :mod:`megatron_lsh.models.gpt`).
The MLM head is Megatron's BERT head: dense(h, h) -> gelu -> LayerNorm -> logits against the
tied word embedding plus a vocab-parallel bias.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lsh.config import ModelConfig, MoEConfig
from megatron_lsh.models.base import StageModel
from megatron_lsh.models.embedding import (OutputLayer, first_stage_embedding,
                                          mark_shared_embedding)
from megatron_lsh.models.transformer import TransformerBlock
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.layers import build_layernorm, init_method_normal
from megatron_lsh.parallel.pipeline import stage_layer_range
from megatron_lsh.parallel.random import SeedPart, layer_seed, seeded


class MLMHead(nn.Module):
    """dense -> gelu -> LayerNorm on the hidden states, before the tied output layer."""

    def __init__(self, config: ModelConfig, seed: int, sequence_parallel: bool, device=None):
        super().__init__()
        with seeded(seed):
            self.dense = nn.Linear(config.hidden_size, config.hidden_size, device=device)
            if self.dense.weight.device.type != "meta":
                init_method_normal(config.init_method_std)(self.dense.weight)
                nn.init.zeros_(self.dense.bias)
            self.layernorm = build_layernorm(config.hidden_size, config.layernorm_epsilon,
                                             sequence_parallel, device=device)
        if sequence_parallel:  # replicated weights that saw only this rank's tokens
            for p in self.dense.parameters():
                p.sequence_parallel = True

    def forward(self, x_sbh: torch.Tensor) -> torch.Tensor:
        return self.layernorm(F.gelu(self.dense(x_sbh)))


class RobertaModel(StageModel):
    """This rank's stage of RoBERTa-MoE.

    ``forward(input_ids [b, s] | hidden_states, padding_mask [b, s] (True = real token),
    labels [b, s] | None)`` returns ``(out, aux_loss)`` like :class:`GPTModel`.
    """

    kind = "roberta"

    @staticmethod
    def synthetic_batch(config: ModelConfig, batch: int, generator: torch.Generator) -> dict:
        """Random tokens with 15% of the positions masked (id 0), the first always among them
        so the loss never has zero tokens; no padding."""
        s, v = config.seq_length, config.vocab_size
        tokens = torch.randint(1, v, (batch, s), generator=generator)
        masked = torch.rand(batch, s, generator=generator) < 0.15
        masked[:, 0] = True
        return dict(input_ids=torch.where(masked, torch.zeros_like(tokens), tokens),
                    padding_mask=torch.ones(batch, s, dtype=torch.bool), labels=tokens,
                    loss_mask=masked.float())

    def __init__(self, config: ModelConfig, moe: MoEConfig, groups: ProcessGroups, *,
                 seed: int = 1234, sequence_parallel: bool = False, device=None):
        super().__init__()
        self.pre_process = groups.is_first_stage
        self.post_process = groups.is_last_stage
        layers = stage_layer_range(config.num_layers, groups.pp_size, groups.pp_rank)
        self.embedding = first_stage_embedding(config, groups, seed=seed + SeedPart.EMBEDDING,
                                               tied=True, sequence_parallel=sequence_parallel,
                                               device=device)
        self.encoder = TransformerBlock(config, moe, groups, [n + 1 for n in layers], seed=seed,
                                        causal=False, final_layernorm=self.post_process,
                                        sequence_parallel=sequence_parallel, device=device)
        self.head = self.output_layer = None
        if self.post_process:
            self.head = MLMHead(config, layer_seed(seed, 0, SeedPart.MLM_HEAD), sequence_parallel,
                                device=device)
            self.output_layer = OutputLayer(
                config, groups, seed=seed + SeedPart.EMBEDDING,
                tied_weight=self.embedding.word_embeddings.weight if self.pre_process else None,
                sequence_parallel=sequence_parallel, bias=True, device=device)
            if not self.pre_process:
                mark_shared_embedding(self.output_layer.weight, groups)

    def forward(self, input_ids: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None,
                hidden_states: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
        x = self.embedding(input_ids) if self.pre_process else hidden_states
        x, aux = self.encoder(x, padding_mask)
        if not self.post_process:
            return x, aux
        return self.output_layer(self.head(x), labels), aux
