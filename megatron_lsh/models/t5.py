"""T5-MoE: an encoder-decoder trained with span corruption.

Encoder: bidirectional self-attention over the corrupted input. Decoder: causal
self-attention plus cross-attention to the encoder output. Word and position embeddings are
shared by encoder, decoder and the output layer (logits plus a vocab-parallel bias).

Layers are numbered 1..E (encoder) and E+1..E+D (decoder): MoE every k-th layer thus picks the
same positions in both stacks when E is a multiple of k.

Pipeline parallelism: pp = 1, or pp = 2 with the encoder on stage 0 and the decoder on
stage 1 (which then holds a copy of the shared embeddings, summed over the embedding group).
Deeper T5 pipelines would need the encoder output forwarded through the decoder stages;
they are refused with a clear message.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_lsh.config import ConfigError, ModelConfig, MoEConfig
from megatron_lsh.models.base import StageModel
from megatron_lsh.models.embedding import Embedding, OutputLayer, mark_shared_embedding
from megatron_lsh.models.transformer import TransformerBlock
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.random import SeedPart


class T5Model(StageModel):
    """This rank's stage of T5-MoE.

    ``forward(encoder_input_ids [b, s_e], decoder_input_ids [b, s_d], encoder_padding_mask
    [b, s_e], hidden_states (stage 1 of pp=2: the encoder output), labels [b, s_d])`` returns
    ``(out, aux_loss)``: the encoder output on an encoder-only stage, else the per-token loss
    [b, s_d] (or logits without labels).
    """

    kind = "t5"

    @classmethod
    def total_num_layers(cls, config: ModelConfig) -> int:
        """Encoder plus decoder layers (numbered 1..E, then E+1..E+D)."""
        return config.num_layers + config.decoder_num_layers

    @classmethod
    def decoder_num_layers(cls, config: ModelConfig) -> int:
        """The decoder stack's layers."""
        return config.decoder_num_layers

    @classmethod
    def tokens_per_sample(cls, config: ModelConfig) -> int:
        """Encoder plus decoder tokens."""
        return config.seq_length + config.decoder_seq_length

    @staticmethod
    def synthetic_batch(config: ModelConfig, batch: int, generator: torch.Generator) -> dict:
        """Random encoder tokens and decoder labels (decoder input: the labels shifted right
        after a start token 0); no padding, every decoder position counting in the loss."""
        s, v = config.seq_length, config.vocab_size
        sd = config.decoder_seq_length
        labels = torch.randint(1, v, (batch, sd), generator=generator)
        return dict(encoder_input_ids=torch.randint(1, v, (batch, s), generator=generator),
                    encoder_padding_mask=torch.ones(batch, s, dtype=torch.bool),
                    decoder_input_ids=torch.cat([torch.zeros(batch, 1, dtype=torch.long),
                                                 labels[:, :-1]], dim=1),
                    labels=labels, loss_mask=torch.ones(batch, sd))

    def __init__(self, config: ModelConfig, moe: MoEConfig, groups: ProcessGroups, *,
                 seed: int = 1234, sequence_parallel: bool = False, device=None):
        super().__init__()
        if groups.pp_size > 2:
            raise ConfigError(f"T5 supports pipeline-model-parallel-size 1 or 2 (encoder and "
                              f"decoder on separate stages), got {groups.pp_size}")
        if sequence_parallel:
            raise ConfigError("T5 does not support sequence parallelism yet")
        self.has_encoder = groups.pp_rank == 0
        self.has_decoder = groups.pp_rank == groups.pp_size - 1
        enc, dec = config.num_layers, config.decoder_num_layers
        max_pos = max(config.max_position_embeddings, config.decoder_seq_length)
        self.embedding = Embedding(config, groups, seed=seed + SeedPart.EMBEDDING,
                                   max_positions=max_pos, device=device)
        if groups.pp_size > 1:  # each stage holds a copy of the shared embeddings
            mark_shared_embedding(self.embedding.word_embeddings.weight, groups)
            if self.embedding.position_embeddings is not None:
                mark_shared_embedding(self.embedding.position_embeddings.weight, groups)
        self.encoder = self.decoder = self.output_layer = None
        if self.has_encoder:
            self.encoder = TransformerBlock(config, moe, groups, range(1, enc + 1), seed=seed,
                                            causal=False, device=device)
        if self.has_decoder:
            self.decoder = TransformerBlock(config, moe, groups, range(enc + 1, enc + dec + 1),
                                            seed=seed, causal=True, cross_attention=True,
                                            stack_start=enc + 1, stack_layers=dec,
                                            device=device)
            self.output_layer = OutputLayer(config, groups, seed=seed + SeedPart.EMBEDDING,
                                            tied_weight=self.embedding.word_embeddings.weight,
                                            bias=True, device=device)

    def forward(self, encoder_input_ids: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.Tensor] = None,
                encoder_padding_mask: Optional[torch.Tensor] = None,
                hidden_states: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
        aux = None
        if self.has_encoder:
            context, aux = self.encoder(self.embedding(encoder_input_ids), encoder_padding_mask)
            if not self.has_decoder:
                return context, aux
        else:
            context = hidden_states
        y, dec_aux = self.decoder(self.embedding(decoder_input_ids), None, context,
                                  encoder_padding_mask)
        aux = dec_aux if aux is None else aux + dec_aux
        return self.output_layer(y, labels), aux
