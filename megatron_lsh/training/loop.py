"""The pretraining loop shared by GPT-MoE, RoBERTa-MoE and T5-MoE (and any other task).

Everything that depends on the model kind (model class, batch -> model inputs, loss and its
name, datasets, layer counts, tokens per sample) comes from the run's
:class:`~megatron_lsh.training.tasks.Task`; the loop never asks which kind it trains.

:class:`Trainer` has named steps, read top to bottom:

1. ``setup``: process groups, seeds, model (this rank's stage, wrapped in the bucketed DDP),
   optimizer, learning-rate schedule, datasets, and a resume from ``--load``;
2. ``train_step``: one global batch: every micro-batch through the pipeline schedule, the
   gradient reduction, tied-embedding sync, and the optimizer step;
3. ``evaluate``: the validation loss on a fixed set of batches (comparable across runs), and
   the task's scores (top-1 / top-5 for image classification);
4. ``save``: a checkpoint of everything stateful (model, optimizer + loss scaler, schedule,
   RNG, sampler position, LSH rotations, config);
5. ``train``: the loop with logging, evaluation, saving and the exit conditions.
"""
from __future__ import annotations

import math
import resource
import time
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_lsh.config import MegatronLSHConfig
from megatron_lsh.models.transformer import TransformerLayer
from megatron_lsh.parallel import random as mp_random
from megatron_lsh.parallel.data_parallel import DistributedDataParallel
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups, init_distributed
from megatron_lsh.parallel.optimizer_factory import build_optimizer
from megatron_lsh.parallel.p2p import PipelineP2P
from megatron_lsh.parallel.pipeline import (StageOutput, allreduce_tied_embedding_grads,
                                            forward_backward, sync_tied_embedding_weights)
from megatron_lsh.training import checkpointing
from megatron_lsh.training.data import build_run_tokenizer
from megatron_lsh.training.logger import TrainingLogger, format_arguments
from megatron_lsh.training.lr_schedule import OptimizerParamScheduler
from megatron_lsh.training.moe_stats import StepMoEStats, world_sum
from megatron_lsh.training.signals import DistributedSignalHandler, ExitDurationTimer
from megatron_lsh.training.tasks import Task, get_task
from megatron_lsh.training.watchdog import (CollectiveWatchdog, is_collective_failure,
                                            launched_with_parent_death_signal)


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a NaN loss without loss scaling)."""


def _resident_memory() -> str:
    """This process's resident memory now: anonymous and file-backed (mapped checkpoint
    pages, which the kernel can drop), from /proc (Linux; '' elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return ""
    mib = {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile") if k in fields}
    return ", ".join(f"{k} {v:.0f} MiB now" for k, v in mib.items())


class Trainer:
    """Trains the task named ``kind`` (a ``TASKS`` name: 'gpt', 'roberta', 't5', or a
    :class:`Task` object) from a :class:`MegatronLSHConfig`."""

    def __init__(self, config: MegatronLSHConfig, kind: "str | Task",
                 log: Callable[[str], None] = print):
        self.config = config
        self.task: Task = kind if isinstance(kind, Task) else get_task(kind)
        self.iteration = 0
        self.consumed_samples = 0
        self._log = log

    # -- 1. setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build groups, model, optimizer, schedule and data; resume if ``--load`` is set."""
        cfg, par = self.config, self.config.parallel
        rank, world = init_distributed(par.distributed_backend, par.distributed_timeout_minutes)
        launched_with_parent_death_signal()
        self.watchdog = CollectiveWatchdog(par.distributed_timeout_minutes)
        self.rank = rank
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
        dims = ParallelDims(world, tp=par.tensor_model_parallel_size,
                            pp=par.pipeline_model_parallel_size,
                            ep=par.expert_model_parallel_size, dp=par.data_parallel_size)
        dims.check_model(cfg.model.num_layers, cfg.model.num_attention_heads,
                         cfg.moe.num_experts,
                         self.task.decoder_num_layers(cfg.model))
        gbs = cfg.training.global_batch_size or cfg.training.micro_batch_size * dims.dp
        self.global_batch_size = gbs
        self.config = cfg = self._resolved_length(cfg, gbs)
        self.num_microbatches = dims.check_batch(gbs, cfg.training.micro_batch_size)
        self.groups = ProcessGroups.build(dims)
        mp_random.model_parallel_seed(cfg.training.seed, self.groups)
        self.log(format_arguments(cfg, {"world_size": world, "data_parallel_size": dims.dp}))
        self.log(f"> layout: {dims}, micro-batches per step: {self.num_microbatches}")

        self.tokenizer = build_run_tokenizer(cfg)
        if self.tokenizer is not None and self.tokenizer.vocab_size != cfg.model.vocab_size:
            self.log(f"> vocabulary size from the tokenizer: {self.tokenizer.vocab_size}")
            cfg.model.vocab_size = self.tokenizer.vocab_size
        model = self.task.build_model(cfg.model, cfg.moe, self.groups, seed=cfg.training.seed,
                                      sequence_parallel=par.sequence_parallel, device=self.device)
        if cfg.optimizer.bf16 or cfg.optimizer.fp16:
            model = model.to(torch.bfloat16 if cfg.optimizer.bf16 else torch.float16)
        self.model = model
        self.moe_layers = self._moe_layers()
        self.timing = cfg.logging.timing_log_level > 0
        for _, layer in self.moe_layers:
            layer.mlp.timing = self.timing
        self.ddp = DistributedDataParallel(model, self.groups,
                                           bucket_size_mb=par.grad_bucket_size_mb,
                                           use_distributed_optimizer=par.use_distributed_optimizer)
        sync_tied_embedding_weights(list(model.parameters()), self.groups)
        self.optimizer = build_optimizer(self.ddp, cfg.optimizer, self.groups,
                                         use_distributed_optimizer=par.use_distributed_optimizer)
        self.scheduler = OptimizerParamScheduler.from_config(self.optimizer, cfg.optimizer,
                                                             cfg.training.train_iters)
        self.p2p = PipelineP2P(self.groups, dtype=next(model.parameters()).dtype,
                               device=self.device) if dims.pp > 1 else None
        n_params = sum(p.numel() for p in model.parameters())
        self.log(f"> this rank's stage has {n_params:,} parameters "
                 f"({len(self.moe_layers)} of {self.num_moe_layers} MoE layers)")
        self.layout = checkpointing.parallel_layout(
            self.groups, num_experts=cfg.moe.num_experts, num_layers=cfg.model.num_layers,
            hidden_size=cfg.model.hidden_size,
            use_distributed_optimizer=par.use_distributed_optimizer)
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        self.optimizer.param_names = [self._param_names[id(p)]
                                      for p in self.optimizer.model_params]
        self._clean_stale_saves()
        if cfg.checkpoint.load:
            self._load(cfg.checkpoint.load)
        self.data = self._build_data()
        balance = cfg.moe.aux_loss_coeff if cfg.moe.load_balancing_type != "none" else 0.0
        self.logger = TrainingLogger(cfg.logging, train_iters=cfg.training.train_iters,
                                     enabled=(rank == world - 1), aux_loss_coeff=balance,
                                     global_batch_size=self.global_batch_size,
                                     resume_iteration=self.iteration or None,
                                     print_fn=self._log)
        self.signal_handler = (DistributedSignalHandler()
                               if cfg.training.exit_signal_handler else None)
        self.exit_timer = (ExitDurationTimer(cfg.training.exit_duration_in_mins)
                           if cfg.training.exit_duration_in_mins else None)

    def _resolved_length(self, cfg: MegatronLSHConfig, gbs: int) -> MegatronLSHConfig:
        """The config with the run's length in iterations at ``gbs`` samples per step
        (``--train-samples`` converted; fine-tuning counts epochs instead)."""
        resolved = cfg.resolved_for_batch(gbs)
        if resolved is not cfg:
            self.log(f"> --train-samples {cfg.training.train_samples} at {gbs} samples per "
                     f"step: {resolved.training.train_iters} iterations")
        return resolved

    def _build_data(self):
        """The run's datasets and loaders, as the task builds them (:meth:`Task.build_data`;
        fine-tuning overrides this with its GLUE files)."""
        return self.task.build_data(self.config, self.groups, self.global_batch_size,
                                    self.tokenizer, self.log)

    def log(self, message: str) -> None:
        """Print on global rank 0 only."""
        if not dist.is_initialized() or dist.get_rank() == 0:
            self._log(message)

    def _moe_layers(self) -> list:
        """(global MoE index, TransformerLayer) for the MoE layers of this stage, in order."""
        cfg = self.config
        numbers = self.task.moe_layer_numbers(cfg.model, cfg.moe)
        self.num_moe_layers = len(numbers)
        # A transformer layer, or any block that declares itself one (Swin's blocks).
        return [(numbers.index(m.layer_number), m) for m in self.model.modules()
                if (isinstance(m, TransformerLayer) or getattr(m, "is_block", False))
                and m.is_moe]

    # -- 2. one training step -------------------------------------------------------------------
    def _forward_step_fn(self, batches: list, moe_stats: Optional[StepMoEStats]):
        model, task, groups = self.model, self.task, self.groups

        def forward_step(mb: int, inputs):
            batch = batches[mb]
            hidden = inputs[0] if inputs else None
            out, aux = model(**task.model_inputs(batch, hidden))
            if moe_stats is not None:
                moe_stats.accumulate()
            if not groups.is_last_stage:
                return StageOutput(outputs=[out], loss=aux)
            loss = task.loss(out, batch)
            return StageOutput(loss=loss + aux, report={task.loss_name: loss.detach()})
        return forward_step

    def _next_batches(self, iterator: Iterator) -> list:
        return [{k: v.to(self.device) for k, v in next(iterator).items()}
                for _ in range(self.num_microbatches)]

    def train_step(self, iterator: Iterator) -> dict:
        """Run one global batch and the optimizer step; returns the iteration's metrics."""
        start = time.perf_counter()
        for _, layer in self.moe_layers:
            layer.mlp.set_iteration(self.iteration)
        self.optimizer.zero_grad()
        moe_stats = StepMoEStats(self.moe_layers, self.num_moe_layers, self.timing)
        batches = self._next_batches(iterator)
        t0 = time.perf_counter()
        step, phase = self.iteration + 1, self.watchdog.phase
        with phase("forward-backward (MoE all-to-all, pipeline send/receive)", step):
            reports = forward_backward(self._forward_step_fn(batches, moe_stats),
                                       self.num_microbatches, self.groups, self.p2p,
                                       no_sync=self.ddp.no_sync,
                                       loss_scale=self.optimizer.get_loss_scale,
                                       schedule=self.config.parallel.pipeline_schedule)
        t1 = time.perf_counter()
        with phase("gradient all-reduce", step):
            self.ddp.finish_grad_sync()
            allreduce_tied_embedding_grads(list(self.model.parameters()), self.groups)
        t2 = time.perf_counter()
        with phase("optimizer step", step):
            result = self.optimizer.step()
        t3 = time.perf_counter()
        if result.stepped:
            self.scheduler.step()
        self.iteration += 1
        self.consumed_samples += self.global_batch_size
        with phase("loss all-reduce", step):
            loss = self._reduce_loss(reports)
        if not math.isfinite(loss) and result.stepped:
            ranks = self._nonfinite_ranks(reports)
            where = (f"not finite on rank{'s' if len(ranks) > 1 else ''} "
                     f"{', '.join(map(str, ranks))}" if ranks else "finite on every rank")
            error = TrainingError(f"the {self.task.loss_name} is {loss} at iteration "
                                  f"{self.iteration} ({where}): stopping (use --fp16 loss "
                                  f"scaling to skip such steps, or lower the learning rate)")
            error.all_ranks = True   # every rank stops here with the same sentence
            raise error
        elapsed = time.perf_counter() - start
        tokens = self.global_batch_size * self.task.tokens_per_sample(self.config.model)
        metrics = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                   "losses": {self.task.loss_name: loss}, "lr": self.scheduler.get_lr(),
                   "grad_norm": float(result.grad_norm), "loss_scale": float(result.loss_scale),
                   "skipped": not result.stepped, "ms_per_iter": elapsed * 1e3,
                   "tokens_per_s": tokens / elapsed, "moe": moe_stats.reduce(self.device)}
        if self.timing:
            metrics["timers"] = moe_stats.timers(
                {"forward_backward": 1e3 * (t1 - t0), "grad_sync": 1e3 * (t2 - t1),
                 "optimizer": 1e3 * (t3 - t2)}, self.device)
        return metrics

    def _reduce_loss(self, reports: list) -> float:
        """Mean task loss over every micro-batch of every DP replica (same on every rank)."""
        counts = self.groups.is_last_stage and self.groups.tp_rank == 0
        total = sum(float(r[self.task.loss_name]) for r in reports) if counts else 0.0
        s, n = world_sum([total, len(reports) if counts else 0.0], self.device)
        return s / max(n, 1.0)

    def _nonfinite_ranks(self, reports: list) -> list:
        """Global ranks whose own micro-batch losses were not finite (collective)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        flags = [0.0] * world
        if any(not math.isfinite(float(r[self.task.loss_name])) for r in reports):
            flags[self.rank] = 1.0
        return [r for r, flag in enumerate(world_sum(flags, self.device)) if flag]

    # -- 3. evaluation --------------------------------------------------------------------------
    def _eval_step_fn(self, batches: list):
        model, task, groups = self.model, self.task, self.groups

        def forward_step(mb: int, inputs):
            batch = batches[mb]
            hidden = inputs[0] if inputs else None
            out, _ = model(**task.eval_inputs(batch, hidden))
            if not groups.is_last_stage:
                return StageOutput(outputs=[out])
            return StageOutput(report=task.eval_report(out, batch))
        return forward_step

    @torch.no_grad()
    def evaluate_with_scores(self) -> Optional[tuple[float, dict]]:
        """``(validation loss, scores)`` over the validation batches (None without data): the
        task's report of every micro-batch (:meth:`Task.eval_report`) summed over them and
        over the ranks that own the loss, then turned into numbers by
        :meth:`Task.eval_result` (the language models: the mean loss over ``eval_iters``
        fixed batches, no scores; image classification: loss, top-1, top-5 over the whole
        validation set)."""
        iterator = self.data.valid_iterator()
        iters = self.data.eval_iters
        if iterator is None or iters == 0:
            return None
        self.model.eval()
        keys = self.task.eval_keys
        totals, count = [0.0] * len(keys), 0
        counts = self.groups.is_last_stage and self.groups.tp_rank == 0
        for _ in range(iters):
            batches = self._next_batches(iterator)
            reports = forward_backward(self._eval_step_fn(batches), self.num_microbatches,
                                       self.groups, self.p2p, forward_only=True)
            if counts:
                for report in reports:
                    totals = [t + float(report[k]) for t, k in zip(totals, keys)]
                count += len(reports)
        self.model.train()
        summed = world_sum(totals + [float(count if counts else 0)], self.device)
        return self.task.eval_result(dict(zip(keys, summed[:-1])), summed[-1])

    def evaluate(self) -> Optional[float]:
        """The validation loss (see :meth:`evaluate_with_scores`)."""
        result = self.evaluate_with_scores()
        return None if result is None else result[0]

    def _validate(self) -> Optional[float]:
        """Evaluate, log the validation box / scalars / JSONL record, return the loss."""
        result = self.evaluate_with_scores()
        if result is None:
            return None
        loss, scores = result
        losses = {self.task.loss_name: loss}
        if not self.task.loss_has_perplexity:   # e.g. a classification loss: no PPL
            losses, scores = {}, {**losses, **scores}
        self.logger.log_validation(self.iteration, losses, self.consumed_samples,
                                   scores=scores or None)
        return loss

    # -- 4. checkpoints -------------------------------------------------------------------------
    @property
    def _sharded_optimizer(self) -> bool:
        """ZeRO-1: every data-parallel rank holds its own optimizer shard."""
        return self.config.parallel.use_distributed_optimizer

    def state_dict(self) -> dict:
        """Everything needed to resume exactly that every rank of a (tp, pp, ep) position
        shares (the optimizer too, unless it is sharded over DP: see :meth:`save`)."""
        state = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                 "model": self.model.state_dict(), "config": self.config.to_dict(),
                 "model_kind": self.task.name, "rng_state": mp_random.state_dict()}
        if not self._sharded_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        state["opt_param_scheduler"] = self.scheduler.state_dict()
        task_state = self.task_state()
        if task_state is not None:
            state["task_state"] = task_state
        return state

    def task_state(self) -> Optional[dict]:
        """Layout-free progress of the run's objective to checkpoint beyond the loop's own
        (fine-tuning: the dev scores of every epoch); None saves nothing."""
        return None

    def load_task_state(self, state: Optional[dict]) -> None:
        """Restore :meth:`task_state` on resume (None: the checkpoint had none)."""

    def save(self) -> None:
        """Write a checkpoint of the current iteration to ``--save``."""
        save_dir = self.config.checkpoint.save
        if not save_dir:
            return
        t0 = time.perf_counter()
        with self.watchdog.phase("checkpoint save", self.iteration):
            # ZeRO-1 shards differ on every DP rank: each rank writes its own file.
            per_dp = ({"optimizer": self.optimizer.state_dict()} if self._sharded_optimizer
                      else None)
            final = checkpointing.save_checkpoint(
                self.iteration, self.state_dict(), save_dir, self.groups, layout=self.layout,
                per_dp_rank_state=per_dp,
                keep_last=self.config.checkpoint.keep_last_n_checkpoints)
        self.log(f"> saved checkpoint at iteration {self.iteration} to {final} "
                 f"({time.perf_counter() - t0:.1f} s)")

    def _clean_stale_saves(self) -> None:
        """Rank 0 removes what crashed saves left in --save / --load (temp, pruned folders)."""
        ck = self.config.checkpoint
        folders = {f for f in (ck.save, ck.load) if f}
        if folders and (not dist.is_initialized() or dist.get_rank() == 0):
            for folder in sorted(folders):
                try:
                    removed = checkpointing.clean_stale(folder)
                except OSError as error:
                    self.log(f"WARNING: cannot clean up {folder}: {error}")
                    continue
                if removed:
                    self.log(f"> cleaned up {len(removed)} folder(s) crashed saves left in "
                             f"{folder}: {', '.join(removed)}")
        if folders and dist.is_initialized():
            dist.barrier()

    def _load(self, load_dir: str) -> None:
        ck = self.config.checkpoint
        loaded = checkpointing.load_checkpoint(load_dir, self.groups,
                                               expected_layout=self.layout,
                                               step=ck.ckpt_step, fallback=ck.load_fallback,
                                               log=self.log)
        if loaded is None:
            self.log(checkpointing.no_checkpoint_warning(load_dir))
            return
        iteration, state = loaded
        if "reshard_from" in state:
            self._load_resharded(load_dir, iteration, state)
            return
        checkpointing.load_model_state(self.model, state["model"],
                                       f"checkpoint {load_dir} iteration {iteration}", self.log)
        if ck.finetune or ck.no_load_optim:
            self.optimizer.reload_model_params()
        if ck.finetune:
            self.log(f"> loaded model weights of iteration {iteration} for finetuning")
            return
        if not ck.no_load_optim:
            optimizer = (state.get("per_dp_rank_state") or {}).get("optimizer") \
                if self._sharded_optimizer else state.get("optimizer")
            if optimizer is None:
                kind = ("a ZeRO-1 (--use-distributed-optimizer) optimizer shard per data-parallel "
                        "rank" if self._sharded_optimizer else "an optimizer state")
                raise checkpointing.CheckpointError(
                    f"checkpoint {load_dir} iteration {iteration} holds no {kind}; load it with "
                    f"--no-load-optim, or with the --use-distributed-optimizer setting it was "
                    f"saved with")
            try:
                self.optimizer.load_state_dict(optimizer)
            except ValueError as error:
                raise checkpointing.CheckpointError(
                    f"checkpoint {load_dir} iteration {iteration}: {error}") from None
            self.scheduler.load_state_dict(state["opt_param_scheduler"])
        if not ck.no_load_rng:
            mp_random.load_state_dict(state["rng_state"])
        self.iteration = int(state["iteration"])
        self.consumed_samples = int(state["consumed_samples"])
        self.load_task_state(state.get("task_state"))
        self.log(f"> resumed from {load_dir} at iteration {self.iteration} "
                 f"({self.consumed_samples} samples consumed)")

    def _load_resharded(self, load_dir: str, iteration: int, state: dict) -> None:
        """Load a checkpoint saved in another parallel layout (see ``training/reshard.py``)."""
        from megatron_lsh.training.reshard import Resharder, describe_change
        ck = self.config.checkpoint
        t0 = time.perf_counter()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
        resharder = Resharder(state["reshard_from"], self.groups, log=self.log)
        resharder.load_model(self.model, ignore=checkpointing.is_compressor_state,
                             optional=checkpointing.is_compressor_state)
        if ck.finetune or ck.no_load_optim:
            self.optimizer.reload_model_params()
        if ck.finetune:
            self.log(f"> loaded model weights of iteration {iteration} for finetuning, "
                     f"resharded ({describe_change(state['saved_layout'], self.layout)})")
            return
        if not ck.no_load_optim:
            resharder.load_optimizer(self.optimizer, self._param_names)
            scaler = resharder.loss_scaler_state()
            if scaler is not None:
                self.optimizer.loss_scaler.load_state_dict(scaler)
            self.scheduler.load_state_dict(state["opt_param_scheduler"])
        self.iteration = int(state["iteration"])
        self.consumed_samples = int(state["consumed_samples"])
        self.load_task_state(state.get("task_state"))
        rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
        shard = sum(p.numel() * p.element_size() for p in self.model.parameters())
        memory = _resident_memory()
        self.log(f"> resumed from {load_dir} at iteration {self.iteration} "
                 f"({self.consumed_samples} samples consumed), resharded "
                 f"({describe_change(state['saved_layout'], self.layout)}) in "
                 f"{time.perf_counter() - t0:.1f} s; the random-number states belong to the "
                 f"old layout's ranks and were not restored")
        self.log(f"> reshard memory on rank 0: peak resident +{rise / 1024:.0f} MiB during the "
                 f"load ({memory}; its weights: {shard / 2**20:.0f} MiB)")

    # -- 5. the loop ----------------------------------------------------------------------------
    def _should_exit(self) -> Optional[str]:
        tr = self.config.training
        if self.signal_handler is not None and self.signal_handler.any_received():
            return "a termination signal"
        if tr.exit_interval and self.iteration % tr.exit_interval == 0:
            return f"--exit-interval {tr.exit_interval}"
        if self.exit_timer is not None and self.exit_timer.expired():
            return f"--exit-duration-in-mins {tr.exit_duration_in_mins}"
        return None

    def train(self) -> dict:
        """Train to ``train_iters`` (or an exit condition); returns a summary.

        A collective that times out or loses a peer becomes a :class:`TrainingError` naming
        the collective and the ranks that did not reach it (see ``watchdog``).
        """
        try:
            return self._train()
        except Exception as error:  # noqa: BLE001 - re-raised unless it is a collective failure
            if not is_collective_failure(error):
                raise
            message, speaker = self.watchdog.explain(error)
            failure = TrainingError(message)
            failure.speaker = speaker
            raise failure from error

    def _train(self) -> dict:
        tr, ck = self.config.training, self.config.checkpoint
        if self.iteration >= tr.train_iters:
            self.log(f"> already trained to iteration {self.iteration} (--train-iters "
                     f"{tr.train_iters}): nothing to do")
            self.logger.close()
            return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                    "last_lm_loss": None, "first_valid_loss": None, "last_valid_loss": None,
                    "exit_reason": "train_iters reached"}
        iterator = self.data.train_iterator(self.consumed_samples)
        first_valid = last_valid = None
        if self.iteration == 0 and self.data.has_valid:
            first_valid = last_valid = self._validate()
        exit_reason, last = None, None
        while self.iteration < tr.train_iters:
            last = self.train_step(iterator)
            self.logger.log_iteration(last)
            saved = False
            if tr.eval_interval and self.iteration % tr.eval_interval == 0 and self.data.has_valid:
                with self.watchdog.phase("evaluation", self.iteration):
                    last_valid = self._validate()
            if ck.save and ck.save_interval and self.iteration % ck.save_interval == 0:
                self.save()
                saved = True
            exit_reason = self._should_exit()
            if exit_reason:
                if ck.save and not saved:
                    self.save()
                self.log(f"> exiting at iteration {self.iteration} because of {exit_reason}")
                break
        else:
            if ck.save and (not ck.save_interval or self.iteration % ck.save_interval):
                self.save()
        self.logger.close()
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "last_lm_loss": last["losses"][self.task.loss_name] if last else None,
                "first_valid_loss": first_valid, "last_valid_loss": last_valid,
                "exit_reason": exit_reason}


def pretrain(config: MegatronLSHConfig, kind: str, log: Callable[[str], None] = print) -> dict:
    """Set up and run a pretraining job; the entry scripts call only this."""
    return run_trainer(Trainer(config, kind, log=log))


def run_trainer(trainer: Trainer) -> dict:
    """Set up and train ``trainer``; the process group it started is destroyed after."""
    owns_process_group = not dist.is_initialized()
    trainer.setup()
    summary = trainer.train()
    if dist.is_initialized():
        dist.barrier()
        if owns_process_group:
            dist.destroy_process_group()
    return summary
