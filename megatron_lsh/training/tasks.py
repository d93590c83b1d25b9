"""What differs between model kinds (GPT, RoBERTa, T5 pretraining, ...): one :class:`Task` each.

The training loop and the run's data code are the same for every kind; whatever depends on
the kind is a method or attribute of its task, so adding a kind (image classification,
GLUE-style classification heads, ...) means adding a :class:`Task` subclass and a ``TASKS``
entry, not editing the loop. A task owns:

- ``model_class`` and :meth:`Task.build_model`: this rank's stage of the model;
- :meth:`Task.model_inputs`: a collated dataset batch -> the model's forward keyword arguments;
- :meth:`Task.loss` and ``loss_name``: the model's output -> the loss to train on, and the
  name the loop reports it under (``"lm loss"`` for the language models, as Megatron logs it);
- ``dataset_class`` and :meth:`Task.dataset_kwargs`: what ``build_train_valid_test_datasets``
  builds, with which class-specific arguments;
- :meth:`Task.total_num_layers` / :meth:`Task.decoder_num_layers`: the transformer layers
  the MoE layer numbering counts, and a separate decoder stack for the pipeline split check;
- :meth:`Task.tokens_per_sample` (for tokens/s) and :meth:`Task.synthetic_batch`.

Architecture facts (layer counts, tokens per sample, synthetic batches) are declared by the
model class (:class:`~megatron_lsh.models.base.StageModel`), which the models layer itself
uses; the task forwards to it, so both layers agree by construction.
"""
from __future__ import annotations

from typing import ClassVar, Dict, Optional, Type

import torch

from megatron_lsh.config import ConfigError, MegatronLSHConfig, ModelConfig, MoEConfig
from megatron_lsh.data.gpt_dataset import GPTDataset
from megatron_lsh.data.mlm_dataset import MLMDataset
from megatron_lsh.data.t5_dataset import T5Dataset
from megatron_lsh.models.base import StageModel
from megatron_lsh.models.gpt import GPTModel
from megatron_lsh.models.roberta import RobertaModel
from megatron_lsh.models.swin import SwinMoEModel
from megatron_lsh.models.t5 import T5Model
from megatron_lsh.parallel.dims import ProcessGroups


class Task:
    """One model kind's objective; subclasses set the class attributes and :meth:`inputs`."""

    name: ClassVar[str]
    """The kind's name, as in ``Recipe.kind`` and the entry points ('gpt', 'roberta', 't5',
    'swin')."""
    model_class: ClassVar[Type[StageModel]]
    """The model (one pipeline stage of it)."""
    dataset_class: ClassVar[type]
    """The dataset class ``build_train_valid_test_datasets`` builds."""
    loss_name: ClassVar[str] = "lm loss"
    """The name the loss is reported under (logs, metrics, validation)."""
    loss_has_perplexity: ClassVar[bool] = True
    """The validation box reports ``exp(loss)`` as PPL (a language model's loss)."""

    def build_model(self, model: ModelConfig, moe: MoEConfig, groups: ProcessGroups, *,
                    seed: int, sequence_parallel: bool = False, device=None) -> torch.nn.Module:
        """This rank's stage of the model, initialised from ``seed``."""
        return self.model_class(model, moe, groups, seed=seed,
                                sequence_parallel=sequence_parallel, device=device)

    def inputs(self, batch: dict) -> dict:
        """The model's forward keyword arguments taken from a collated dataset batch."""
        raise NotImplementedError

    def model_inputs(self, batch: dict, hidden_states: Optional[torch.Tensor] = None) -> dict:
        """Keyword arguments of the model's forward for one micro-batch; ``hidden_states`` is
        what the previous pipeline stage sent (None on the first stage)."""
        kwargs = self.inputs(batch)
        if hidden_states is not None:
            kwargs["hidden_states"] = hidden_states
        return kwargs

    @staticmethod
    def loss(per_token_loss: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean loss over the tokens that count (``loss_mask``), in fp32."""
        mask = batch["loss_mask"].float()
        return (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)

    def dataset_kwargs(self, config: MegatronLSHConfig) -> dict:
        """Extra keyword arguments of ``dataset_class`` taken from the run's config."""
        return {}

    def build_data(self, config: MegatronLSHConfig, groups: ProcessGroups,
                   global_batch_size: int, tokenizer, log):
        """The run's datasets and loaders: for the language models the pretraining datasets
        of ``dataset_class`` (:class:`~megatron_lsh.training.data.RunData`)."""
        from megatron_lsh.training.data import build_data
        return build_data(config, self, groups, global_batch_size, tokenizer=tokenizer, log=log)

    # -- evaluation: what a validation pass reports per micro-batch and how it adds up ------
    @property
    def eval_keys(self) -> tuple:
        """The numbers :meth:`eval_report` returns, summed over micro-batches and ranks."""
        return (self.loss_name,)

    def eval_inputs(self, batch: dict, hidden_states: Optional[torch.Tensor] = None) -> dict:
        """The model's keyword arguments in a validation pass (the training ones)."""
        return self.model_inputs(batch, hidden_states)

    def eval_report(self, out: torch.Tensor, batch: dict) -> dict:
        """One micro-batch's numbers (``eval_keys``) from the last stage's output."""
        return {self.loss_name: float(self.loss(out, batch))}

    def eval_result(self, totals: dict, reports: float) -> tuple[float, dict]:
        """``(loss, scores)`` from the summed reports of a validation pass: the mean of the
        micro-batches' mean losses, no scores."""
        return totals[self.loss_name] / max(reports, 1.0), {}

    def total_num_layers(self, model: ModelConfig) -> int:
        """Transformer layers of the whole model (MoE layers are numbered over these)."""
        return self.model_class.total_num_layers(model)

    def moe_layer_numbers(self, model: ModelConfig, moe) -> list:
        """Global numbers of the model's MoE layers (for per-layer statistics)."""
        return self.model_class.moe_layer_numbers(model, moe)

    def decoder_num_layers(self, model: ModelConfig) -> Optional[int]:
        """Layers of a separate decoder stack, or None (for the pipeline split check)."""
        return self.model_class.decoder_num_layers(model)

    def tokens_per_sample(self, model: ModelConfig) -> int:
        """Tokens a sample feeds the model (encoder + decoder for T5), for tokens/s."""
        return self.model_class.tokens_per_sample(model)

    def synthetic_batch(self, model: ModelConfig, batch: int, seed: int) -> dict:
        """Random model inputs plus ``loss_mask`` (as :func:`~megatron_lsh.models.synthetic.
        synthetic_batch` of this kind)."""
        return self.model_class.synthetic_batch(model, batch, torch.Generator().manual_seed(seed))


class GPTTask(Task):
    """Causal language modelling: predict every next token."""

    name = "gpt"
    model_class = GPTModel
    dataset_class = GPTDataset

    def inputs(self, batch: dict) -> dict:
        """``tokens`` and ``labels`` (the tokens shifted by one)."""
        return dict(input_ids=batch["tokens"], labels=batch["labels"])


class RobertaTask(Task):
    """Masked language modelling: predict the masked tokens (no next-sentence task)."""

    name = "roberta"
    model_class = RobertaModel
    dataset_class = MLMDataset

    def inputs(self, batch: dict) -> dict:
        """Masked ``tokens``, the padding mask (True = real token) and the original tokens."""
        return dict(input_ids=batch["tokens"], padding_mask=batch["padding_mask"].bool(),
                    labels=batch["labels"])

    def dataset_kwargs(self, config: MegatronLSHConfig) -> dict:
        """The share of tokens to mask (``--mask-prob``)."""
        return dict(mask_prob=config.data.mask_prob)


class T5Task(Task):
    """Span corruption: the decoder restores the spans replaced by sentinels in the input."""

    name = "t5"
    model_class = T5Model
    dataset_class = T5Dataset

    def inputs(self, batch: dict) -> dict:
        """Encoder and decoder tokens, the encoder padding mask, the decoder targets."""
        return dict(encoder_input_ids=batch["encoder_tokens"],
                    decoder_input_ids=batch["decoder_tokens"],
                    encoder_padding_mask=batch["encoder_padding_mask"].bool(),
                    labels=batch["labels"])

    def dataset_kwargs(self, config: MegatronLSHConfig) -> dict:
        """The decoder length (``--decoder-seq-length``)."""
        return dict(decoder_seq_length=config.model.decoder_seq_length)


class SwinTask(Task):
    """Image classification (Swin-MoE): cross-entropy of the classes; validation reports the
    loss and top-1 / top-5 accuracy over the whole ``val/`` folder."""

    name = "swin"
    model_class = SwinMoEModel
    dataset_class = None   # images: megatron_lsh.training.image_data
    loss_name = "classification loss"
    loss_has_perplexity = False
    eval_keys = ("loss_sum", "count", "top1", "top5")

    def inputs(self, batch: dict) -> dict:
        """Images and labels."""
        return dict(images=batch["images"], labels=batch["labels"])

    def build_data(self, config: MegatronLSHConfig, groups: ProcessGroups,
                   global_batch_size: int, tokenizer, log):
        """``--data-path DIR`` with ``train/`` and ``val/`` class folders."""
        from megatron_lsh.training.image_data import ImageRunData
        return ImageRunData(config, groups, global_batch_size, log=log)

    def eval_inputs(self, batch: dict, hidden_states: Optional[torch.Tensor] = None) -> dict:
        """Images only: the model returns the logits."""
        return dict(images=batch["images"])

    def eval_report(self, logits: torch.Tensor, batch: dict) -> dict:
        """Summed cross-entropy (no label smoothing), sample count, top-1 / top-5 hits."""
        mask = batch["loss_mask"].float()
        labels = batch["labels"].long()
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == labels.unsqueeze(-1)
        return {"loss_sum": float((loss * mask).sum()), "count": float(mask.sum()),
                "top1": float((hits[:, 0].float() * mask).sum()),
                "top5": float((hits.any(-1).float() * mask).sum())}

    def eval_result(self, totals: dict, reports: float) -> tuple[float, dict]:
        """Mean loss, and top-1 / top-5 accuracy as ``valid_top1`` / ``valid_top5``."""
        n = max(totals["count"], 1.0)
        return totals["loss_sum"] / n, {"valid_top1": totals["top1"] / n,
                                        "valid_top5": totals["top5"] / n}


TASKS: Dict[str, Task] = {task.name: task
                          for task in (GPTTask(), RobertaTask(), T5Task(), SwinTask())}
"""Every task by name."""


def get_task(name: str) -> Task:
    """The task called ``name``; a :class:`ConfigError` naming the known ones otherwise."""
    if name not in TASKS:
        raise ConfigError(f"model kind must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]
