"""``finetune_glue.py``: fine-tune a pretrained GPT-MoE on one GLUE task.

    torchrun --nproc-per-node 4 finetune_glue.py --task SST-2 --data-dir glue/SST-2 \\
        --pretrained-checkpoint runs/gpt --expert-model-parallel-size 4 --epochs 3 \\
        --micro-batch-size 8 --global-batch-size 32 --lr 1e-4 --results-json out/sst2.json

Every pretraining flag applies (layouts, compressors, precision, optimizer, logging,
``--save`` / ``--load`` of the fine-tuning run itself). The model is the one the pretrained
checkpoint records, with any model flag overriding a field of it (``--seq-length 64`` to
fine-tune on shorter samples), as flags override a recipe; ``--model-recipe`` (or no
checkpoint) defines it as the pretraining scripts do. The tokenizer likewise comes from the
checkpoint unless ``--tokenizer-type`` is given. The all-to-all compressor is the one the flags name (default
none), whatever pretraining used. The run's length is ``--epochs``; ``--train-iters`` /
``--train-samples`` do not apply.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron_lsh.config import ConfigError, DataConfig
from megatron_lsh.training.entry import _recipe_flag, announce_compat, base_for, run_job

TOKENIZER_FIELDS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model",
                    "vocab_extra_ids")
"""The data settings that name the tokenizer (taken from the pretrained checkpoint)."""
REFUSED = {"train_iters": "--train-iters", "train_samples": "--train-samples",
           "data_path": "--data-path", "train_data_path": "--train-data-path",
           "valid_data_path": "--valid-data-path", "test_data_path": "--test-data-path",
           "mock_data": "--mock-data"}
"""Pretraining flags that have no meaning here (the length is in epochs, data is --data-dir)."""


def add_finetune_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags fine-tuning adds to the pretraining ones."""
    parser = _recipe_flag(parser)
    from megatron_lsh.glue.data import TASKS
    from megatron_lsh.models.classification import POOLINGS
    group = parser.add_argument_group("GLUE fine-tuning")
    group.add_argument("--task", required=True, metavar="NAME",
                       help=f"GLUE task: {', '.join(TASKS)}")
    group.add_argument("--data-dir", required=True, metavar="DIR",
                       help="the task's folder as GLUE distributes it (train.tsv, dev.tsv, "
                            "test.tsv; MNLI: dev_matched.tsv, ...)")
    group.add_argument("--pretrained-checkpoint", metavar="CKPT_DIR",
                       help="a pretraining --save folder (any layout) to start from")
    group.add_argument("--epochs", type=int, default=3, help="passes over train.tsv")
    group.add_argument("--results-json", metavar="PATH",
                       help="write {task, dev: {metric: value}, history, ...} here, and a "
                            "markdown table next to it (.md)")
    group.add_argument("--predictions-dir", metavar="DIR",
                       help="GLUE submission files of test.tsv (default: predictions/ next to "
                            "--results-json)")
    group.add_argument("--early-stopping-patience", type=int, metavar="P",
                       help="stop after P epochs without a better dev score (default: run "
                            "every epoch)")
    group.add_argument("--classifier-pooling", choices=POOLINGS, default="last",
                       help="classify from the last real token's hidden state (default) or "
                            "the mean over real tokens")
    return parser


def finetune_base(namespace: argparse.Namespace) -> dict:
    """Base configs: the pretrained checkpoint's model (with the uncompressed all-to-all) and
    tokenizer, which model flags then override as they override a recipe; with
    ``--model-recipe``, or without a checkpoint, what the pretraining scripts take."""
    given = set(vars(namespace))
    refused = [flag for name, flag in REFUSED.items() if name in given]
    if refused:
        raise ConfigError(f"{refused[0]} does not apply to fine-tuning: its length is --epochs "
                          f"and its data is --data-dir")
    pretrained = namespace.pretrained_checkpoint
    if namespace.model_recipe or not pretrained:
        return base_for(namespace, "tiny-gpt-moe")
    from megatron_lsh.convert.load import open_checkpoint
    from megatron_lsh.training.checkpoint_files import CheckpointError
    try:
        ckpt = open_checkpoint(pretrained)
    except CheckpointError as error:
        raise ConfigError(f"--pretrained-checkpoint: {error}") from None
    base = {"model": ckpt.model_config, "moe": ckpt.moe_config}
    saved = ckpt.run_config.get("data", {})
    if "tokenizer_type" not in given and saved.get("tokenizer_type"):
        base["data"] = DataConfig(**{k: saved[k] for k in TOKENIZER_FIELDS if k in saved})
    if os.environ.get("RANK", "0") == "0":
        print(f"> model{' and tokenizer' if 'data' in base else ''} from the pretrained "
              f"checkpoint {pretrained} (iteration {ckpt.iteration})", flush=True)
    return base


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the flags, fine-tune, score; returns the exit status."""
    from megatron_lsh.arguments import parse_args_with_namespace

    argv = list(sys.argv[1:] if argv is None else argv)
    config, ns = parse_args_with_namespace(argv, finetune_base,
                                           extra_args_provider=add_finetune_flags)
    announce_compat(ns)

    def job() -> dict:
        from megatron_lsh.finetune.trainer import FinetuneSettings, FinetuneTrainer
        from megatron_lsh.glue.data import get_task, read_split
        from megatron_lsh.training.loop import run_trainer

        settings = FinetuneSettings(
            task=get_task(ns.task), data_dir=ns.data_dir, epochs=ns.epochs,
            pretrained_checkpoint=ns.pretrained_checkpoint, results_json=ns.results_json,
            predictions_dir=ns.predictions_dir,
            early_stopping_patience=ns.early_stopping_patience, pooling=ns.classifier_pooling)
        train = read_split(settings.task, settings.data_dir, "train")
        return run_trainer(FinetuneTrainer(config, settings, len(train)))

    return run_job(job)

