"""The base of every model kind: what the code around a model may ask its class.

A model class (GPT, RoBERTa, T5, later e.g. classification models) is one pipeline stage,
built as ``cls(config, moe, groups, *, seed, sequence_parallel, device)``, whose forward
returns ``(out, aux_loss)``. Besides that, its class answers the questions that depend on the
architecture and not on the objective: how many transformer layers a config gives (MoE layers
are numbered over all of them), which of them form a separate decoder stack (for the pipeline
split check), how many tokens a sample feeds the model, and what a random batch looks like.
Training tasks (:mod:`megatron_lsh.training.tasks`) and benchmarks ask the class, so no code
outside the model needs to know which kind it is.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

from megatron_lsh.config import ModelConfig, MoEConfig


class StageModel(nn.Module):
    """One pipeline stage of a model kind; subclasses set ``kind`` and ``synthetic_batch``."""

    kind: ClassVar[str] = ""
    """The name the model is registered under (``MODEL_CLASSES``), e.g. ``"gpt"``."""

    @classmethod
    def total_num_layers(cls, config: ModelConfig) -> int:
        """Transformer layers of the whole model, numbered 1..N (MoE placement counts these)."""
        return config.num_layers

    @classmethod
    def decoder_num_layers(cls, config: ModelConfig) -> Optional[int]:
        """Layers of a separate decoder stack (split over pipeline stages on their own), or
        None when the model has one stack."""
        return None

    @classmethod
    def moe_layer_numbers(cls, config: ModelConfig, moe: MoEConfig) -> list:
        """Global numbers of the MoE layers; placement counts within each stack (encoder,
        then decoder), as ``--moe-layer-freq`` does in Megatron."""
        total, decoder = cls.total_num_layers(config), cls.decoder_num_layers(config) or 0
        stacks = [(1, total - decoder)] + ([(total - decoder + 1, decoder)] if decoder else [])
        if moe.enabled:
            moe.check_skip_layers([size for _, size in stacks])
        return [start + p - 1 for start, size in stacks for p in range(1, size + 1)
                if moe.is_moe_layer(p, size)]

    @classmethod
    def tokens_per_sample(cls, config: ModelConfig) -> int:
        """Tokens one sample feeds the model (for tokens/s)."""
        return config.seq_length

    @staticmethod
    def synthetic_batch(config: ModelConfig, batch: int, generator: torch.Generator) -> dict:
        """Random model inputs (forward's keyword arguments) plus ``loss_mask``, drawn from
        ``generator``, shaped like the real data of this kind."""
        raise NotImplementedError
