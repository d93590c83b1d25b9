"""GPT-MoE: a decoder-only language model (causal self-attention, tied embeddings).

One ``GPTModel`` object is one pipeline stage: the first stage embeds tokens, the last
computes the loss, middle stages only run their layers. With pp = 1 the single stage does all.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_lsh.config import ModelConfig, MoEConfig
from megatron_lsh.models.base import StageModel
from megatron_lsh.models.embedding import (OutputLayer, first_stage_embedding,
                                          mark_shared_embedding)
from megatron_lsh.models.transformer import InferenceCache, TransformerBlock
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.pipeline import stage_layer_range
from megatron_lsh.parallel.random import SeedPart


class GPTModel(StageModel):
    """This rank's stage of GPT-MoE.

    ``forward(input_ids [b, s] | hidden_states [s, b, h], labels [b, s] | None)`` returns
    ``(out, aux_loss)``: on the last stage ``out`` is the per-token loss [b, s] (or logits
    [s, b, V/tp] without labels), elsewhere the hidden states for the next stage.
    """

    kind = "gpt"

    @staticmethod
    def synthetic_batch(config: ModelConfig, batch: int, generator: torch.Generator) -> dict:
        """Random tokens shifted by one: ``input_ids`` and ``labels`` [b, s], every position
        counting in ``loss_mask``."""
        s, v = config.seq_length, config.vocab_size
        tokens = torch.randint(0, v, (batch, s + 1), generator=generator)
        return dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(batch, s))

    def __init__(self, config: ModelConfig, moe: MoEConfig, groups: ProcessGroups, *,
                 seed: int = 1234, sequence_parallel: bool = False, device=None):
        super().__init__()
        self.config = config
        self.pre_process = groups.is_first_stage
        self.post_process = groups.is_last_stage
        tied = not config.untie_embeddings_and_output_weights
        layers = stage_layer_range(config.num_layers, groups.pp_size, groups.pp_rank)
        self.embedding = first_stage_embedding(config, groups, seed=seed + SeedPart.EMBEDDING,
                                               tied=tied, sequence_parallel=sequence_parallel,
                                               device=device)
        self.decoder = TransformerBlock(config, moe, groups, [n + 1 for n in layers], seed=seed,
                                        causal=True, final_layernorm=self.post_process,
                                        sequence_parallel=sequence_parallel, device=device)
        self.output_layer = None
        if self.post_process:
            share_here = tied and self.pre_process
            self.output_layer = OutputLayer(
                config, groups,
                seed=seed + (SeedPart.EMBEDDING if tied else SeedPart.OUTPUT),
                tied_weight=self.embedding.word_embeddings.weight if share_here else None,
                sequence_parallel=sequence_parallel, device=device)
            if tied and not share_here:
                mark_shared_embedding(self.output_layer.weight, groups)

    def forward(self, input_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                hidden_states: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                cache: Optional[InferenceCache] = None):
        """``cache``: incremental decoding (one stage, eval mode): the tokens continue the ones
        the cache holds, and the cache advances past them."""
        if cache is not None and position_ids is None and input_ids is not None:
            s = input_ids.shape[1]
            position_ids = torch.arange(cache.offset, cache.offset + s,
                                        device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        x = self.embedding(input_ids, position_ids) if self.pre_process else hidden_states
        x, aux = self.decoder(x, cache=cache)
        if cache is not None:
            cache.offset += x.shape[0]
        if not self.post_process:
            return x, aux
        return self.output_layer(x, labels), aux
