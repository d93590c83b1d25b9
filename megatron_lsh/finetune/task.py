"""The fine-tuning objective as a training :class:`~megatron_lsh.training.tasks.Task`.

The training loop, its log line, TensorBoard, metrics JSONL, checkpoints and every parallel
layout and compressor come with the task abstraction: what differs is the model (GPT-MoE
with a classification head, :class:`~megatron_lsh.models.classification.GPTClassifier`), its
inputs and the loss name. The loss is the mean over the samples of the micro-batch that
count (``loss_mask`` [b]: padding samples of an evaluation batch do not).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_lsh.config import ModelConfig, MoEConfig
from megatron_lsh.glue.data import GlueTask
from megatron_lsh.models.classification import GPTClassifier, classification_loss
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.training.tasks import Task


class ClassificationTask(Task):
    """Sequence classification (cross-entropy) or regression (squared error) of GLUE samples."""

    name = GPTClassifier.kind
    model_class = GPTClassifier
    dataset_class = None   # fine-tuning reads GLUE files (megatron_lsh.finetune.data)

    def __init__(self, glue_task: GlueTask, pooling: str = "last"):
        self.glue_task = glue_task
        self.pooling = pooling
        self.loss_name = "regression loss" if glue_task.is_regression else "classification loss"
        self.loss_has_perplexity = False

    def build_model(self, model: ModelConfig, moe: MoEConfig, groups: ProcessGroups, *,
                    seed: int, sequence_parallel: bool = False, device=None) -> torch.nn.Module:
        """This rank's stage of the classifier, with one output per class (1 for STS-B)."""
        return GPTClassifier(model, moe, groups, seed=seed, sequence_parallel=sequence_parallel,
                             device=device, num_classes=self.glue_task.num_classes,
                             pooling=self.pooling)

    def inputs(self, batch: dict) -> dict:
        """Tokens, the padding mask and the labels of a :class:`~megatron_lsh.finetune.data.
        SplitDataset` batch."""
        return dict(input_ids=batch["tokens"], padding_mask=batch["padding_mask"].bool(),
                    labels=batch["labels"])

    def eval_inputs(self, batch: dict, hidden_states: Optional[torch.Tensor] = None) -> dict:
        """Without labels: the model returns the logits, which scoring needs."""
        kwargs = self.model_inputs(batch, hidden_states)
        kwargs.pop("labels")
        return kwargs

    def eval_report(self, logits: torch.Tensor, batch: dict) -> dict:
        """Per micro-batch: sample indices and logits (for predictions and metrics), the
        summed loss and the count of samples that count (padding samples do not)."""
        mask = batch["loss_mask"].float()
        loss = classification_loss(logits, batch["labels"], self.glue_task.is_regression)
        return {"sample": batch["sample"].cpu(), "logits": logits.cpu(),
                "loss": float((loss * mask).sum()), "count": float(mask.sum())}
