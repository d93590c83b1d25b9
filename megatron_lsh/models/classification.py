"""GPT-MoE with a sequence classification (or regression) head, for GLUE-style fine-tuning.

The body is :class:`~megatron_lsh.models.gpt.GPTModel`'s (same module names, so a pretrained
GPT-MoE checkpoint fills it by name in any layout); the language-model output layer is
replaced by ``classification_head``: dropout, then one linear layer from the pooled hidden
state to ``num_classes`` outputs (1 for regression).

Pooling. ``last`` (the default) takes the final hidden state of each sample's last real token
(the last position where ``padding_mask`` is True): in a causal decoder that is the only
position that has attended to the whole input, which is why GPT-style classifiers read it
(GPT-1's extract token, Hugging Face's ``GPT2ForSequenceClassification``). ``mean`` averages
the hidden states of the real tokens; in a causal model most of those saw only a prefix, so
it is offered for comparison, not as the default. Right padding never changes the states of
real tokens under causal attention, so no attention mask is needed.

The head is replicated on every tensor-parallel rank: its input (the final layer norm's
output) is the same on all of them, so are its gradients. With sequence parallelism the
final hidden states are gathered along the sequence first.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lsh.config import ConfigError, ModelConfig, MoEConfig
from megatron_lsh.models.base import StageModel
from megatron_lsh.models.embedding import first_stage_embedding
from megatron_lsh.models.transformer import TransformerBlock
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.layers import init_method_normal
from megatron_lsh.parallel.mappings import gather_from_sequence_parallel_region
from megatron_lsh.parallel.pipeline import stage_layer_range
from megatron_lsh.parallel.random import SeedPart, layer_seed, seeded

POOLINGS = ("last", "mean")
"""How the sequence is reduced to one vector per sample (see the module docstring)."""


def pool(x_sbh: torch.Tensor, padding_mask_bs: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[s, b, h]`` hidden states -> ``[b, h]``: the last real token's, or the real tokens'
    mean (``padding_mask`` True = real token; every sample needs at least one)."""
    mask = padding_mask_bs.to(torch.bool)
    lengths = mask.sum(dim=1)
    if pooling == "last":
        last = (lengths - 1).clamp(min=0)
        return x_sbh[last, torch.arange(x_sbh.shape[1], device=x_sbh.device)]
    weights = mask.transpose(0, 1).unsqueeze(-1).to(x_sbh.dtype)
    return (x_sbh * weights).sum(dim=0) / lengths.clamp(min=1).unsqueeze(-1).to(x_sbh.dtype)


class ClassificationHead(nn.Module):
    """Dropout, then ``Linear(h, num_classes)`` (normal init, zero bias)."""

    def __init__(self, config: ModelConfig, num_classes: int, seed: int, device=None):
        super().__init__()
        self.dropout = config.hidden_dropout
        with seeded(seed):
            self.dense = nn.Linear(config.hidden_size, num_classes, device=device)
            if self.dense.weight.device.type != "meta":
                init_method_normal(config.init_method_std)(self.dense.weight)
                nn.init.zeros_(self.dense.bias)

    def forward(self, pooled_bh: torch.Tensor) -> torch.Tensor:
        return self.dense(F.dropout(pooled_bh, self.dropout, self.training))


class GPTClassifier(StageModel):
    """This rank's stage of a GPT-MoE sequence classifier (or regressor: ``num_classes=1``).

    ``forward(input_ids [b, s] | hidden_states, padding_mask [b, s] (True = real token),
    labels [b] | None)`` returns ``(out, aux_loss)``: on the last stage ``out`` is the
    per-sample loss [b] (cross-entropy, or squared error for regression) with labels and the
    fp32 logits [b, num_classes] without; elsewhere the hidden states for the next stage.
    """

    kind = "gpt-classifier"

    @staticmethod
    def synthetic_batch(config: ModelConfig, batch: int, generator: torch.Generator) -> dict:
        """Random tokens of random lengths (right padding), two-class labels; every sample
        counts in ``loss_mask`` [b]."""
        s, v = config.seq_length, config.vocab_size
        tokens = torch.randint(0, v, (batch, s), generator=generator)
        lengths = torch.randint(1, s + 1, (batch,), generator=generator)
        padding_mask = torch.arange(s).unsqueeze(0) < lengths.unsqueeze(1)
        return dict(input_ids=tokens * padding_mask, padding_mask=padding_mask,
                    labels=torch.randint(0, 2, (batch,), generator=generator),
                    loss_mask=torch.ones(batch))

    def __init__(self, config: ModelConfig, moe: MoEConfig, groups: ProcessGroups, *,
                 seed: int = 1234, sequence_parallel: bool = False, device=None,
                 num_classes: int = 2, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"--classifier-pooling must be one of {', '.join(POOLINGS)}, "
                              f"got {pooling!r}")
        if num_classes < 1:
            raise ConfigError(f"a classifier needs at least one output, got {num_classes}")
        self.config = config
        self.num_classes, self.pooling = num_classes, pooling
        self.tp_group = groups.tp
        self.sequence_parallel = sequence_parallel
        self.pre_process = groups.is_first_stage
        self.post_process = groups.is_last_stage
        layers = stage_layer_range(config.num_layers, groups.pp_size, groups.pp_rank)
        # Not tied to an output layer: the word embedding lives on the first stage only.
        self.embedding = first_stage_embedding(config, groups, seed=seed + SeedPart.EMBEDDING,
                                               tied=False, sequence_parallel=sequence_parallel,
                                               device=device)
        self.decoder = TransformerBlock(config, moe, groups, [n + 1 for n in layers], seed=seed,
                                        causal=True, final_layernorm=self.post_process,
                                        sequence_parallel=sequence_parallel, device=device)
        self.classification_head = None
        if self.post_process:
            self.classification_head = ClassificationHead(
                config, num_classes, layer_seed(seed, 0, SeedPart.CLASSIFICATION_HEAD),
                device=device)

    @property
    def is_regression(self) -> bool:
        """One output: a score trained with the squared error."""
        return self.num_classes == 1

    def forward(self, input_ids: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None,
                hidden_states: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
        x = self.embedding(input_ids) if self.pre_process else hidden_states
        x, aux = self.decoder(x)
        if not self.post_process:
            return x, aux
        if self.sequence_parallel:
            # The head is replicated compute: each rank keeps its slice of the gradient.
            x = gather_from_sequence_parallel_region(x, self.tp_group,
                                                     tensor_parallel_output_grad=False)
        logits = self.classification_head(pool(x, padding_mask, self.pooling)).float()
        if labels is None:
            return logits, aux
        return classification_loss(logits, labels, self.is_regression), aux


def classification_loss(logits_bc: torch.Tensor, labels_b: torch.Tensor,
                        regression: bool) -> torch.Tensor:
    """Per-sample loss [b] of fp32 logits: cross-entropy against class indices, or the
    squared error of the single output against the score (regression)."""
    if regression:
        return (logits_bc.squeeze(-1) - labels_b.float()).square()
    return F.cross_entropy(logits_bc, labels_b.long(), reduction="none")
