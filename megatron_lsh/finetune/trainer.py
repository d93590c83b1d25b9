"""Fine-tuning on a GLUE task: the pretraining :class:`~megatron_lsh.training.loop.Trainer`
with epochs, dev scoring, early stopping, test predictions and a results file.

What is inherited unchanged: process groups and every layout (TP / PP / DP / EP, ZeRO-1,
sequence parallelism), the compressors, mixed precision, the training step, the log line,
TensorBoard, the metrics JSONL, checkpoints (save, exact resume, resharding) and the exit
conditions. What fine-tuning adds:

- the run's length is ``--epochs`` over the train split in whole optimizer steps;
- at step 0 (not when resuming its own ``--load``) the body is filled from
  ``--pretrained-checkpoint`` by name, in any layout it was saved in, the head left as
  initialised (:func:`load_pretrained`);
- after every epoch the dev split(s) are scored with the task's official metrics (logged in
  the validation box, TensorBoard and the metrics JSONL); when the first dev split's main
  metric (the task's first) improves, the test split(s) are predicted and written in GLUE's
  submission format, and the results JSON / markdown are rewritten; with
  ``--early-stopping-patience P`` the run stops after P epochs without improvement;
- the per-epoch history is part of the checkpoint, so a resumed run continues it.

Evaluation uses the model as trained, with the run's all-to-all compressor: the scores are
those of the model as it would run in the same cluster.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from megatron_lsh.config import ConfigError, MegatronLSHConfig
from megatron_lsh.finetune.data import GlueData, read_task_splits
from megatron_lsh.finetune.report import markdown_table, write_text
from megatron_lsh.finetune.task import ClassificationTask
from megatron_lsh.glue.data import SUBMISSION_NAMES, GlueTask, write_predictions
from megatron_lsh.glue.metrics import score
from megatron_lsh.parallel.pipeline import forward_backward
from megatron_lsh.training.checkpoint_files import CheckpointError
from megatron_lsh.training.loop import Trainer


@dataclass
class FinetuneSettings:
    """What a fine-tuning run adds to the pretraining flags."""

    task: GlueTask
    data_dir: str
    epochs: int
    pretrained_checkpoint: Optional[str] = None
    results_json: Optional[str] = None
    predictions_dir: Optional[str] = None
    early_stopping_patience: Optional[int] = None
    pooling: str = "last"

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError(f"--early-stopping-patience must be at least 1, got "
                              f"{self.early_stopping_patience}")


def load_pretrained(model: torch.nn.Module, load_dir: str, groups,
                    log: Callable[[str], None]) -> int:
    """Fill ``model``'s GPT-MoE body from a pretraining checkpoint (any layout); returns the
    checkpoint's iteration. The head, and compressor state the checkpoint lacks, keep their
    initial values; the checkpoint's language-model output layer is not used."""
    from megatron_lsh.convert.load import open_checkpoint
    from megatron_lsh.training.checkpointing import is_compressor_state
    from megatron_lsh.training.reshard import Resharder

    ckpt = open_checkpoint(load_dir)
    if ckpt.kind != "gpt":
        raise CheckpointError(f"--pretrained-checkpoint {load_dir} holds a {ckpt.kind} model; "
                              f"GLUE fine-tuning starts from a GPT-MoE (gpt) checkpoint")

    def ignore(name: str) -> bool:
        return name.startswith("output_layer.") or is_compressor_state(name)

    def optional(name: str) -> bool:
        return name.startswith("classification_head.") or is_compressor_state(name)

    Resharder(ckpt.source, groups, log=log).load_model(model, ignore=ignore, optional=optional)
    return ckpt.iteration


class FinetuneTrainer(Trainer):
    """Trains and scores a GPT-MoE classifier on one GLUE task (see the module docstring)."""

    def __init__(self, config: MegatronLSHConfig, settings: FinetuneSettings,
                 train_examples: int, log: Callable[[str], None] = print):
        super().__init__(config, ClassificationTask(settings.task, settings.pooling), log=log)
        self.settings = settings
        self.train_examples = train_examples
        self.history: List[dict] = []
        self.stopped_early = False

    # -- set-up ----------------------------------------------------------------------------
    def _resolved_length(self, cfg: MegatronLSHConfig, gbs: int) -> MegatronLSHConfig:
        steps = self.train_examples // gbs
        if steps == 0:
            raise ConfigError(f"train.tsv of {self.settings.task.name} has "
                              f"{self.train_examples} examples, fewer than one global batch "
                              f"({gbs})")
        iters = self.settings.epochs * steps
        self.log(f"> {self.settings.epochs} epoch(s) of {steps} steps ({steps * gbs} of "
                 f"{self.train_examples} train examples per epoch): {iters} iterations")
        training = dataclasses.replace(cfg.training, train_iters=iters, train_samples=None)
        return dataclasses.replace(cfg, training=training)

    def _build_data(self) -> GlueData:
        cfg, groups = self.config, self.groups
        if self.tokenizer is None:
            raise ConfigError("fine-tuning needs the tokenizer of the pretrained model: pass "
                              "--tokenizer-type and its files (or a --pretrained-checkpoint "
                              "that records them)")
        splits = read_task_splits(self.settings.task, self.settings.data_dir, self.tokenizer,
                                  cfg.model.seq_length, log=self.log)
        return GlueData(self.settings.task, splits, global_batch_size=self.global_batch_size,
                        micro_batch_size=cfg.training.micro_batch_size, dp_rank=groups.dp_rank,
                        dp_size=groups.dp_size, seed=cfg.training.seed,
                        num_workers=cfg.data.num_workers)

    def setup(self) -> None:
        """The trainer's set-up, then the pretrained body unless this run resumed."""
        super().setup()
        pretrained = self.settings.pretrained_checkpoint
        if self.iteration == 0 and pretrained:
            iteration = load_pretrained(self.model, pretrained, self.groups, self.log)
            self.optimizer.reload_model_params()
            self.log(f"> fine-tuning from {pretrained} (iteration {iteration}); the "
                     f"{self.settings.task.name} head starts from its initial weights")
        elif self.iteration == 0:
            self.log("WARNING: no --pretrained-checkpoint: fine-tuning a randomly initialised "
                     "model")

    def task_state(self) -> dict:
        return {"history": self.history, "stopped_early": self.stopped_early}

    def load_task_state(self, state: Optional[dict]) -> None:
        if state:
            self.history = list(state.get("history", []))
            self.stopped_early = bool(state.get("stopped_early", False))

    # -- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, split) -> tuple[float, list]:
        """``(mean loss, outputs)`` over all of ``split``: outputs in the split's order, class
        indices (or scores for regression); collective."""
        batches, iterator = self.data.eval_batches(split)
        self.model.eval()
        reports: list = []
        for _ in range(batches):
            reports += forward_backward(self._eval_step_fn(self._next_batches(iterator)),
                                        self.num_microbatches, self.groups, self.p2p,
                                        forward_only=True)
        self.model.train()
        if self.groups.tp_rank != 0:
            reports = []   # every TP rank holds the same outputs: count them once
        mine = [(r["sample"], r["logits"], r["loss"], r["count"]) for r in reports]
        everyone = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        outputs: dict = {}
        loss = count = 0.0
        for part in everyone:
            for samples, logits, loss_sum, n in part:
                loss, count = loss + loss_sum, count + n
                for i, row in zip(samples.tolist(), logits):
                    if i >= 0:
                        outputs[i] = (float(row[0]) if self.settings.task.is_regression
                                      else int(row.argmax()))
        if len(outputs) != len(split):
            raise RuntimeError(f"scored {len(outputs)} of the {len(split)} examples of "
                               f"{split.name}")
        return loss / max(count, 1.0), [outputs[i] for i in range(len(split))]

    def _score_dev(self, epoch: int) -> dict:
        """Score every dev split; one history record."""
        task = self.settings.task
        record = {"epoch": epoch, "iteration": self.iteration, "splits": {}}
        for split in self.data.dev:
            loss, predictions = self.predict(split)
            scores = score(task, predictions, [e.label for e in split.examples])
            record["splits"][split.name] = {"loss": loss, **scores}
            prefix = f"{task.name} {split.name} after epoch {epoch}:"
            # A classification loss has no perplexity: it is reported among the scores.
            self.logger.log_validation(self.iteration, {}, self.consumed_samples,
                                       prefix=prefix,
                                       scores={self.task.loss_name: loss, **scores})
        return record

    def _main_score(self, record: dict) -> float:
        first = self.settings.task.dev_splits[0]
        return record["splits"][first][self.settings.task.metrics[0]]

    @property
    def best(self) -> Optional[dict]:
        """The history record with the best main dev score (the earliest of equals)."""
        if not self.history:
            return None
        return max(self.history, key=self._main_score)

    def _predictions_dir(self) -> Optional[str]:
        s = self.settings
        if s.predictions_dir:
            return s.predictions_dir
        if s.results_json:
            return os.path.join(os.path.dirname(os.path.abspath(s.results_json)), "predictions")
        return None

    def _write_test_predictions(self) -> None:
        folder = self._predictions_dir()
        if folder is None or not self.data.test:
            return
        names = dict(zip(self.settings.task.test_splits, SUBMISSION_NAMES[self.settings.task.name]))
        written = []
        for split in self.data.test:
            _, predictions = self.predict(split)
            if not dist.is_initialized() or dist.get_rank() == 0:
                os.makedirs(folder, exist_ok=True)
                path = os.path.join(folder, f"{names[split.name]}.tsv")
                write_predictions(self.settings.task, path, split.examples, predictions)
                written.append(path)
        if written:
            self.log(f"> test predictions of the best epoch so far: {', '.join(written)}")

    def results(self) -> dict:
        """The results file's content (``{"task", "dev": {metric: value}, ...}``)."""
        task, best = self.settings.task, self.best
        first = task.dev_splits[0]
        out = {"task": task.name,
               "dev": ({k: v for k, v in best["splits"][first].items() if k != "loss"}
                       if best else {}),
               "best_epoch": best["epoch"] if best else None,
               "main_metric": task.metrics[0],
               "epochs_run": len(self.history), "stopped_early": self.stopped_early,
               "train_examples": self.train_examples,
               "a2a_compression": self.config.moe.a2a_compression,
               "pretrained_checkpoint": self.settings.pretrained_checkpoint,
               "history": self.history}
        if len(task.dev_splits) > 1 and best:
            out["dev_splits"] = {n: {k: v for k, v in best["splits"][n].items() if k != "loss"}
                                 for n in task.dev_splits}
        return out

    def _write_results(self) -> None:
        path = self.settings.results_json
        if not path or (dist.is_initialized() and dist.get_rank() != 0):
            return
        results = self.results()
        write_text(path, json.dumps(results, indent=2) + "\n")
        write_text(os.path.splitext(path)[0] + ".md", markdown_table(results, self.settings.task))

    def _end_of_epoch(self, epoch: int) -> None:
        record = self._score_dev(epoch)
        self.history.append(record)
        if self.best is record:   # better than every earlier epoch
            self._write_test_predictions()
        self._write_results()

    def _patience_spent(self) -> bool:
        patience = self.settings.early_stopping_patience
        if patience is None or not self.history:
            return False
        return self.history[-1]["epoch"] - self.best["epoch"] >= patience

    # -- the loop --------------------------------------------------------------------------
    def _train(self) -> dict:
        tr, ck = self.config.training, self.config.checkpoint
        steps = self.data.steps_per_epoch
        exit_reason, last = None, None
        if self.stopped_early or self.iteration >= tr.train_iters:
            self.log(f"> fine-tuning already finished at iteration {self.iteration}: "
                     f"nothing to do")
        else:
            iterator = self.data.train_iterator(self.consumed_samples)
            while self.iteration < tr.train_iters:
                last = self.train_step(iterator)
                self.logger.log_iteration(last)
                saved = False
                if self.iteration % steps == 0:
                    epoch = self.iteration // steps
                    with self.watchdog.phase("evaluation", self.iteration):
                        self._end_of_epoch(epoch)
                    if self._patience_spent():
                        self.stopped_early = True
                        exit_reason = (f"early stopping: no better dev "
                                       f"{self.settings.task.metrics[0]} in "
                                       f"{self.settings.early_stopping_patience} epoch(s) since "
                                       f"epoch {self.best['epoch']}")
                if ck.save and (self.iteration % steps == 0 or
                                (ck.save_interval and self.iteration % ck.save_interval == 0)):
                    self.save()
                    saved = True
                exit_reason = exit_reason or self._should_exit()
                if exit_reason:
                    if ck.save and not saved:
                        self.save()
                    self.log(f"> exiting at iteration {self.iteration} because of {exit_reason}")
                    break
        self.logger.close()
        self._write_results()
        best = self.best
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "last_loss": last["losses"][self.task.loss_name] if last else None,
                "best_epoch": best["epoch"] if best else None,
                "dev": self.results()["dev"], "exit_reason": exit_reason}
