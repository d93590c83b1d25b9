"""What differs between GPT, RoBERTa and T5 pretraining: datasets, model inputs, the loss.

A :class:`Task` turns a collated batch from the dataset into the model's keyword arguments
and its per-token output into the masked-mean language-model loss. Everything else in the
training loop is shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_lsh.config import ModelConfig


@dataclass(frozen=True)
class Task:
    """One pretraining objective."""

    name: str
    """'gpt' (causal LM), 'roberta' (masked LM) or 't5' (span corruption)."""
    dataset_kind: str
    """The kind passed to ``build_train_valid_test_datasets``."""

    def model_inputs(self, batch: dict, hidden_states: Optional[torch.Tensor] = None) -> dict:
        """Keyword arguments of the model's forward for one micro-batch."""
        if self.name == "gpt":
            kwargs = dict(input_ids=batch["tokens"], labels=batch["labels"])
        elif self.name == "roberta":
            kwargs = dict(input_ids=batch["tokens"], padding_mask=batch["padding_mask"].bool(),
                          labels=batch["labels"])
        else:
            kwargs = dict(encoder_input_ids=batch["encoder_tokens"],
                          decoder_input_ids=batch["decoder_tokens"],
                          encoder_padding_mask=batch["encoder_padding_mask"].bool(),
                          labels=batch["labels"])
        if hidden_states is not None:
            kwargs["hidden_states"] = hidden_states
        return kwargs

    @staticmethod
    def loss(per_token_loss: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean loss over the tokens that count (``loss_mask``), in fp32."""
        mask = batch["loss_mask"].float()
        return (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)

    def dataset_kwargs(self, model: ModelConfig, mask_prob: float) -> dict:
        """Extra arguments of the dataset class."""
        if self.name == "roberta":
            return dict(mask_prob=mask_prob)
        if self.name == "t5":
            return dict(decoder_seq_length=model.decoder_seq_length)
        return {}

    def tokens_per_sample(self, model: ModelConfig) -> int:
        """Tokens a sample feeds the model (encoder + decoder for T5), for tokens/s."""
        if self.name == "t5":
            return model.seq_length + model.decoder_seq_length
        return model.seq_length


TASKS = {"gpt": Task("gpt", "gpt"), "roberta": Task("roberta", "mlm"), "t5": Task("t5", "t5")}
