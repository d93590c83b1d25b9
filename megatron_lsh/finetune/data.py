"""GLUE examples -> fixed-length token tensors, and the datasets and loaders fine-tuning reads.

A sample is the task's text(s), each followed by the end-of-document token: ``a <eod>`` for
one sentence, ``a <eod> b <eod>`` for a pair. The final ``<eod>`` is where the classifier
reads (last-token pooling, :mod:`megatron_lsh.models.classification`), so it is never cut:
when a sample is longer than ``--seq-length`` the longer text loses tokens from its end first
(as BERT's pair truncation does), and the number of truncated samples is reported. Samples are
right-padded; ``padding_mask`` marks the real tokens.

Training walks epochs of the train split, each a fresh permutation from ``--seed`` cut to
whole optimizer steps (:class:`~megatron_lsh.data.sampler.MegatronPretrainingRandomSampler`
with ``samples_per_epoch``), so a resumed run reads exactly the batches an uninterrupted one
would. Evaluation reads a split in order, padded to whole global batches with copies of its
first sample whose ``loss_mask`` is 0 and whose ``sample`` index is -1 (dropped from scores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch

from megatron_lsh.config import ConfigError
from megatron_lsh.data.sampler import iterate_keeping_rng
from megatron_lsh.glue.data import Example, GlueTask


@dataclass
class EncodedSplit:
    """One split of a task as tensors: ``tokens`` / ``padding_mask`` [N, s], ``labels`` [N]
    (class indices, or float scores for regression; zeros in test splits)."""

    name: str
    examples: List[Example]
    tokens: torch.Tensor
    padding_mask: torch.Tensor
    labels: torch.Tensor
    truncated: int
    """Samples that did not fit ``seq_length`` whole."""

    def __len__(self) -> int:
        return len(self.examples)


def _fit(pieces: List[List[int]], budget: int) -> tuple[List[List[int]], bool]:
    """Cut the longest piece's end, one token at a time, until all fit ``budget`` tokens."""
    pieces = [list(p) for p in pieces]
    cut = False
    while sum(map(len, pieces)) > budget:
        longest = max(range(len(pieces)), key=lambda i: len(pieces[i]))
        pieces[longest].pop()
        cut = True
    return pieces, cut


def encode_split(task: GlueTask, name: str, examples: List[Example], tokenizer,
                 seq_length: int) -> EncodedSplit:
    """Tokenize ``examples`` of one split (see the module docstring for the format)."""
    texts = len(task.text_columns)
    if seq_length < 2 * texts:
        raise ConfigError(f"--seq-length {seq_length} is too short for {task.name} samples "
                          f"({texts} text(s), each followed by an end-of-document token)")
    eod = tokenizer.eod
    n = len(examples)
    tokens = torch.full((n, seq_length), eod, dtype=torch.long)   # padding: masked out
    mask = torch.zeros(n, seq_length, dtype=torch.bool)
    regression = task.is_regression
    labels = torch.zeros(n, dtype=torch.float32 if regression else torch.long)
    truncated = 0
    for i, example in enumerate(examples):
        pieces, cut = _fit([tokenizer.tokenize(t) for t in example.texts], seq_length - texts)
        truncated += cut
        ids = [t for piece in pieces for t in (*piece, eod)]
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = True
        if example.label is not None:
            labels[i] = example.label
    return EncodedSplit(name, list(examples), tokens, mask, labels, truncated)


class SplitDataset(torch.utils.data.Dataset):
    """Samples of an :class:`EncodedSplit`, optionally padded to ``length`` with dummies
    (``loss_mask`` 0, ``sample`` -1) so evaluation covers it in whole global batches."""

    def __init__(self, split: EncodedSplit, length: Optional[int] = None):
        self.split = split
        self.length = len(split) if length is None else length
        if self.length < len(split):
            raise ValueError(f"length {self.length} is below the split's {len(split)} samples")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        real = i < len(self.split)
        j = i if real else 0
        s = self.split
        return {"tokens": s.tokens[j], "padding_mask": s.padding_mask[j], "labels": s.labels[j],
                "loss_mask": torch.tensor(1.0 if real else 0.0),
                "sample": torch.tensor(i if real else -1)}


def _rounded_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class GlueData:
    """The encoded splits of one task and iterators over this DP rank's micro-batches.

    ``train``, ``dev`` (one split, or MNLI's matched and mismatched) and ``test`` splits;
    test splits are optional (GLUE's test labels are hidden, so they only get predictions).
    """

    def __init__(self, task: GlueTask, splits: dict, *, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 num_workers: int = 0):
        self.task = task
        self.train: EncodedSplit = splits["train"]
        self.dev: List[EncodedSplit] = [splits[n] for n in task.dev_splits]
        self.test: List[EncodedSplit] = [splits[n] for n in task.test_splits if n in splits]
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_workers = num_workers
        self.steps_per_epoch = len(self.train) // global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.tsv of {task.name} has {len(self.train)} examples, fewer "
                              f"than one global batch ({global_batch_size})")

    has_valid = True
    """Fine-tuning always has a dev split (the loop's validation flag)."""

    def _loader(self, dataset, consumed: int, **kwargs):
        from megatron_lsh.data.sampler import build_pretraining_data_loader
        return build_pretraining_data_loader(dataset, consumed, self.micro_batch_size,
                                             self.dp_rank, self.dp_size,
                                             num_workers=self.num_workers, **kwargs)

    def train_iterator(self, consumed_samples: int) -> Iterator:
        """This DP rank's training micro-batches from ``consumed_samples`` on (all epochs)."""
        return iterate_keeping_rng(self._loader(
            SplitDataset(self.train), consumed_samples, dataloader_type="cyclic",
            seed=self.seed, samples_per_epoch=self.steps_per_epoch * self.global_batch_size))

    def eval_batches(self, split: EncodedSplit) -> tuple[int, Iterator]:
        """``(global batches, iterator)`` over all of ``split`` for this DP rank."""
        length = _rounded_up(len(split), self.global_batch_size)
        loader = self._loader(SplitDataset(split, length), 0)
        return length // self.global_batch_size, iterate_keeping_rng(loader)


def read_task_splits(task: GlueTask, data_dir: str, tokenizer, seq_length: int,
                     log: Callable[[str], None] = print) -> dict:
    """Every split of ``task`` found in ``data_dir``, encoded (train and dev are required)."""
    import os

    from megatron_lsh.glue.data import read_split
    splits = {}
    for name in ("train", *task.dev_splits, *task.test_splits):
        if name.startswith("test") and not os.path.isfile(os.path.join(data_dir, f"{name}.tsv")):
            log(f"> {task.name}: no {name}.tsv in {data_dir}, no test predictions for it")
            continue
        split = encode_split(task, name, read_split(task, data_dir, name), tokenizer,
                             seq_length)
        note = f", {split.truncated} truncated to {seq_length} tokens" if split.truncated else ""
        log(f"> {task.name} {name}: {len(split)} examples{note}")
        splits[name] = split
    return splits
