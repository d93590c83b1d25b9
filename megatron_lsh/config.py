"""Typed, nested configuration for every component: the one place where a setting is named,
defaulted, documented and checked.

Each component takes its own dataclass (``ModelConfig``, ``MoEConfig`` from
:mod:`megatron_lsh.model_config`, ``ParallelConfig``, ...); the whole run is a
``MegatronLSHConfig`` made of them. A field that users set from the command line is declared
with :func:`setting`, which records its Megatron flag and one-line help in the field's
metadata; ``arguments.py`` derives the whole parser from these declarations (nothing is listed
twice). Checks run in ``__post_init__``, so a config built in code is checked exactly like one
built from flags, and every check raises :class:`ConfigError` with one sentence that names the
setting by its flag (``--num-layers must be positive, got 0``); fields without a flag are
named ``Class.field``.

Fields whose default is derived from other fields (``ffn_hidden_size`` = 4 x ``hidden_size``,
...) are filled in ``__post_init__``; :func:`replace_config` re-derives them when the fields
they depend on change, so recipes and command-line overrides compose as expected.

Compressor settings (``--moe-lsh-*``, ``--moe-cast-*``) are declared the same way, in the
compressor's own file (``megatron_lsh/moe/compressors/``), and travel in
``MoEConfig.compression_options``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Optional

from megatron_lsh.model_config import ModelConfig, MoEConfig
from megatron_lsh.settings import (ConfigError, _derive, check_choice, check_non_negative,
                                   check_positive, check_probability, parse_moe_layer_freq,
                                   replace_config, require, setting, setting_name)

__all__ = ["SECTIONS", "CheckpointConfig", "ConfigError", "DataConfig", "LoggingConfig",
           "MegatronLSHConfig", "ModelConfig", "MoEConfig", "OptimizerConfig", "ParallelConfig",
           "TrainingConfig", "check_choice", "check_non_negative", "check_positive",
           "check_probability", "parse_moe_layer_freq", "replace_config", "require", "setting",
           "setting_name"]


@dataclass
class ParallelConfig:
    """Parallel layout: world = pp * dp * tp; EP is carved out of the dp * tp ranks of a stage."""

    tensor_model_parallel_size: int = setting(1, "--tensor-model-parallel-size",
                                              "Ranks that split each layer's weights.")
    pipeline_model_parallel_size: int = setting(1, "--pipeline-model-parallel-size",
                                                "Pipeline stages.")
    expert_model_parallel_size: int = setting(
        1, "--expert-model-parallel-size", "Ranks that split the experts of each MoE layer.")
    data_parallel_size: Optional[int] = None
    """Derived from the world size when None."""
    sequence_parallel: bool = setting(
        False, "--sequence-parallel",
        "Split LayerNorm and dropout activations along the sequence over the TP group.")
    distributed_backend: Optional[str] = setting(
        None, "--distributed-backend",
        "torch.distributed backend; nccl when CUDA is available, else gloo, when not given.",
        choices=(None, "nccl", "gloo"))
    distributed_timeout_minutes: float = setting(
        10, "--distributed-timeout-minutes", "Timeout of collective operations, in minutes "
        "(fractions allowed: 0.5 is 30 s); a collective stuck that long stops the run with a "
        "message naming the ranks that did not reach it.")
    use_distributed_optimizer: bool = setting(
        False, "--use-distributed-optimizer",
        "Shard the optimizer state over data-parallel ranks (ZeRO-1).")
    num_microbatches_in_flight: Optional[int] = None
    pipeline_schedule: str = "1f1b"
    """'1f1b' or 'afab' (all-forward-all-backward)."""
    grad_bucket_size_mb: float = 25.0

    def __post_init__(self):
        check_positive(self, "tensor_model_parallel_size", "pipeline_model_parallel_size",
                       "expert_model_parallel_size", "distributed_timeout_minutes",
                       "grad_bucket_size_mb")
        if self.data_parallel_size is not None:
            check_positive(self, "data_parallel_size")
        check_choice(self, "distributed_backend")
        check_choice(self, "pipeline_schedule", ("1f1b", "afab"))


@dataclass
class OptimizerConfig:
    """AdamW, learning-rate schedule, mixed precision and loss scaling, clipping."""

    lr: float = setting(1e-3, "--lr", "Peak learning rate.")
    min_lr: float = setting(0.0, "--min-lr", "Learning rate at the end of the decay.")
    lr_decay_style: str = setting("cosine", "--lr-decay-style", "Learning-rate decay shape.",
                                  choices=("constant", "linear", "cosine"))
    lr_decay_iters: Optional[int] = setting(
        None, "--lr-decay-iters",
        "Iterations over which the learning rate decays; train-iters when not given.")
    lr_warmup_iters: int = setting(0, "--lr-warmup-iters", "Linear warmup iterations.")
    lr_decay_samples: Optional[int] = setting(
        None, "--lr-decay-samples", "With --train-samples: samples over which the learning rate "
        "decays; train-samples when not given.")
    lr_warmup_samples: int = setting(0, "--lr-warmup-samples",
                                     "With --train-samples: linear warmup samples.")
    lr_warmup_fraction: Optional[float] = setting(
        None, "--lr-warmup-fraction",
        "Warmup as a fraction of lr-decay-iters (instead of lr-warmup-iters).")
    weight_decay: float = setting(0.01, "--weight-decay", "AdamW weight decay.")
    adam_beta1: float = setting(0.9, "--adam-beta1", "Adam beta1.")
    adam_beta2: float = setting(0.999, "--adam-beta2", "Adam beta2.")
    adam_eps: float = setting(1e-8, "--adam-eps", "Adam epsilon.")
    clip_grad: float = setting(1.0, "--clip-grad", "Clip the global gradient norm (0: off).")
    bf16: bool = setting(False, "--bf16", "Train in bfloat16 with fp32 master weights.")
    fp16: bool = setting(False, "--fp16", "Train in float16 with dynamic loss scaling.")
    loss_scale: Optional[float] = setting(
        None, "--loss-scale", "Static loss scale with --fp16 / --bf16 (steps whose gradients "
        "overflow are still skipped); fp16 scales dynamically when not given.")
    initial_loss_scale: float = setting(2.0 ** 32, "--initial-loss-scale",
                                        "Starting dynamic loss scale (fp16).")
    min_loss_scale: float = setting(1.0, "--min-loss-scale", "Smallest dynamic loss scale.")
    loss_scale_window: int = setting(1000, "--loss-scale-window",
                                     "Clean iterations before the loss scale grows.")
    hysteresis: int = setting(2, "--hysteresis",
                              "Overflows tolerated before the loss scale shrinks.")

    def __post_init__(self):
        check_non_negative(self, "lr", "min_lr", "lr_warmup_iters", "weight_decay", "clip_grad",
                           "lr_warmup_samples")
        if self.lr_decay_samples is not None:
            check_positive(self, "lr_decay_samples")
        if self.loss_scale is not None:
            check_positive(self, "loss_scale")
        require(not (self.lr_warmup_samples and self.lr_warmup_iters),
                "--lr-warmup-samples and --lr-warmup-iters cannot both be set")
        require(not (self.lr_decay_samples and self.lr_decay_iters),
                "--lr-decay-samples and --lr-decay-iters cannot both be set")
        require(self.lr > 0, f"--lr must be positive, got {self.lr}: with a learning rate of 0 "
                             f"the weights never change")
        require(self.min_lr <= self.lr, f"--min-lr ({self.min_lr}) exceeds --lr ({self.lr})")
        check_choice(self, "lr_decay_style")
        if self.lr_decay_iters is not None:
            check_positive(self, "lr_decay_iters")
        if self.lr_warmup_fraction is not None:
            require(0.0 <= self.lr_warmup_fraction <= 1.0,
                    f"--lr-warmup-fraction must be in [0, 1], got {self.lr_warmup_fraction}")
            require(not self.lr_warmup_iters,
                    "--lr-warmup-iters and --lr-warmup-fraction cannot both be set")
        check_probability(self, "adam_beta1", "adam_beta2")
        check_positive(self, "adam_eps", "initial_loss_scale", "min_loss_scale",
                       "loss_scale_window", "hysteresis")
        require(not (self.bf16 and self.fp16), "--bf16 and --fp16 cannot both be set")

    def schedule_iters(self, train_iters: int) -> tuple[float, int]:
        """(warmup iters, decay iters) for a run of ``train_iters``; the warmup must end first."""
        decay_iters = self.lr_decay_iters or train_iters
        require(decay_iters > 0, f"--lr-decay-iters must be positive, got {decay_iters}")
        if self.lr_warmup_fraction is not None:
            warmup_iters = self.lr_warmup_fraction * decay_iters
        else:
            warmup_iters = self.lr_warmup_iters
        require(warmup_iters < decay_iters,
                f"the learning-rate warmup ({warmup_iters} iterations) must end before "
                f"--lr-decay-iters / --train-iters ({decay_iters})")
        return warmup_iters, decay_iters


@dataclass
class TrainingConfig:
    """Batch sizes, iteration counts and the exit conditions of the loop."""

    micro_batch_size: int = setting(2, "--micro-batch-size",
                                    "Samples per forward/backward on one data-parallel rank.")
    global_batch_size: Optional[int] = setting(
        None, "--global-batch-size", "Samples per optimizer step (accumulates micro-batches); "
        "micro-batch-size x data-parallel-size when not given.")
    train_iters: Optional[int] = setting(
        None, "--train-iters", "Optimizer steps to train for (100 when neither it nor "
        "--train-samples is given).")
    train_samples: Optional[int] = setting(
        None, "--train-samples", "Samples to train for, instead of --train-iters: the run "
        "takes train-samples // global-batch-size steps, and --lr-warmup-samples / "
        "--lr-decay-samples set the schedule in samples.")
    seed: int = setting(1234, "--seed", "Random seed.")
    eval_interval: int = setting(100, "--eval-interval", "Iterations between validation runs.")
    eval_iters: int = setting(10, "--eval-iters", "Batches per validation run.")
    exit_interval: Optional[int] = setting(
        None, "--exit-interval", "Save and exit when the iteration is a multiple of this.")
    exit_duration_in_mins: Optional[float] = setting(
        None, "--exit-duration-in-mins", "Save and exit after this many minutes of training.")
    exit_signal_handler: bool = setting(
        False, "--exit-signal-handler",
        "On SIGTERM, save a checkpoint at the end of the iteration and exit.")

    def __post_init__(self):
        if self.train_samples is None:
            _derive(self, "train_iters", 100)
        else:
            check_positive(self, "train_samples")
            require(self.train_iters is None,
                    "--train-iters and --train-samples cannot both be set")
        check_positive(self, "micro_batch_size", "eval_interval")
        if self.train_iters is not None:
            check_positive(self, "train_iters")
        check_non_negative(self, "eval_iters")
        for name in ("global_batch_size", "exit_interval", "exit_duration_in_mins"):
            if getattr(self, name) is not None:
                check_positive(self, name)
        if self.global_batch_size is not None:
            require(self.global_batch_size % self.micro_batch_size == 0,
                    f"--global-batch-size ({self.global_batch_size}) is not divisible by "
                    f"--micro-batch-size ({self.micro_batch_size})")


def _check_data_path(flag: str, paths: list) -> None:
    """Prefixes alone (blended by size, as Megatron), or alternating 'weight prefix' pairs with
    non-negative weights."""
    def is_number(text):
        try:
            float(text)
            return True
        except ValueError:
            return False

    if not paths or not is_number(paths[0]):
        require(not any(is_number(p) for p in paths),
                f"{flag} must be prefixes only ('P1 P2 ...', blended by size) or alternate "
                f"weights and prefixes ('W1 P1 W2 P2 ...'), got {' '.join(paths)!r}")
        return
    require(len(paths) % 2 == 0 and all(is_number(w) for w in paths[0::2]),
            f"{flag} must alternate weights and prefixes ('W1 P1 W2 P2 ...'), "
            f"got {' '.join(paths)!r}")
    weights = [float(w) for w in paths[0::2]]
    require(min(weights) >= 0 and sum(weights) > 0,
            f"{flag} weights must be non-negative with a positive sum, got {weights}")


@dataclass
class DataConfig:
    """Datasets and tokenizer."""

    data_path: list = setting(
        flag="--data-path", help="Dataset prefixes: 'P', 'P1 P2 ...' (blended in proportion to "
        "their tokens) or 'W1 P1 W2 P2 ...'.", default_factory=list, nargs="+",
        show_default=False)
    mock_data: bool = setting(
        False, "--mock-data", "Train on generated random-token documents instead of a corpus "
        "(Megatron's smoke-test data; written once to --data-cache-path or the temp folder).")
    train_data_path: list = setting(
        flag="--train-data-path", help="Separate train prefixes (instead of --data-path cut by "
        "--split).", default_factory=list, nargs="+", show_default=False)
    valid_data_path: list = setting(
        flag="--valid-data-path", help="Separate valid prefixes (instead of --data-path cut by "
        "--split).", default_factory=list, nargs="+", show_default=False)
    test_data_path: list = setting(
        flag="--test-data-path", help="Separate test prefixes (instead of --data-path cut by "
        "--split).", default_factory=list, nargs="+", show_default=False)
    split: str = setting("949,50,1", "--split", "Train, validation, test weights.")
    data_cache_path: Optional[str] = setting(
        None, "--data-cache-path", "Folder for the sample indices; next to the data when not given.")
    tokenizer_type: Optional[str] = setting(None, "--tokenizer-type", "Tokenizer.")
    vocab_file: Optional[str] = setting(None, "--vocab-file", "Tokenizer vocabulary file.")
    merge_file: Optional[str] = setting(None, "--merge-file", "BPE merges file.")
    tokenizer_model: Optional[str] = setting(
        None, "--tokenizer-model", "SentencePiece model or Hugging Face tokenizer.json.")
    vocab_extra_ids: int = setting(0, "--vocab-extra-ids", "T5 sentinel tokens to add.")
    mask_prob: float = setting(0.15, "--mask-prob", "Fraction of tokens masked (MLM, T5).")
    short_seq_prob: float = 0.0
    num_workers: int = setting(0, "--num-workers", "Data-loader worker processes.")
    crop_min_scale: float = setting(
        0.08, "--crop-min-scale", "Images: the smallest share of the image area a training "
        "crop covers (random resized crop; ImageNet's 0.08).")
    hflip: bool = setting(True, "--no-hflip", "Images: no random horizontal flips in training "
                          "(for classes a mirror changes, such as digits).")

    def __post_init__(self):
        require(0.0 < self.crop_min_scale <= 1.0,
                f"--crop-min-scale must be in (0, 1], got {self.crop_min_scale}")
        # Launch scripts often leave quotes in the value ("--split '99,1,0'"), as Megatron takes.
        self.split = self.split.strip().strip("'\"").replace(" ", "")
        parts = self.split.replace("/", ",").split(",")
        require(all(p.strip().replace(".", "", 1).isdigit() for p in parts) and len(parts) <= 3
                and sum(float(p) for p in parts) > 0,
                f"--split must be up to three non-negative weights like '949,50,1', "
                f"got {self.split!r}")
        check_non_negative(self, "vocab_extra_ids", "num_workers")
        check_probability(self, "mask_prob")
        for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
            if getattr(self, name):
                _check_data_path(setting_name(self, name), getattr(self, name))
        require(not (self.data_path and (self.train_data_path or self.valid_data_path
                                         or self.test_data_path)),
                "give either --data-path (cut by --split) or --train-data-path / "
                "--valid-data-path / --test-data-path, not both")


@dataclass
class CheckpointConfig:
    """Where and when to save; what to load."""

    save: Optional[str] = setting(None, "--save", "Folder to save checkpoints in.")
    load: Optional[str] = setting(None, "--load",
                                  "Folder to resume from (scratch if it is absent).")
    save_interval: Optional[int] = setting(None, "--save-interval",
                                           "Iterations between checkpoints.")
    finetune: bool = setting(False, "--finetune",
                             "Load only the model weights and restart at iteration 0.")
    no_load_optim: bool = setting(False, "--no-load-optim", "Do not load the optimizer state.")
    no_load_rng: bool = setting(False, "--no-load-rng", "Do not load the RNG states.")
    ckpt_step: Optional[int] = setting(
        None, "--ckpt-step", "Load this iteration of --load instead of the one "
        "latest_checkpointed_iteration.txt names.")
    load_fallback: bool = setting(
        False, "--load-fallback", "When the checkpoint to load is corrupt or incomplete (a file "
        "fails its checksum, is missing or unreadable), load the newest earlier intact one "
        "instead of stopping, and say which.")
    keep_last_n_checkpoints: Optional[int] = setting(
        None, "--keep-last-n-checkpoints", "After each save, delete all but the newest N "
        "checkpoints in --save (never the one just written).", metavar="N")

    def __post_init__(self):
        if self.save_interval is not None:
            check_positive(self, "save_interval")
        if self.keep_last_n_checkpoints is not None:
            check_positive(self, "keep_last_n_checkpoints")
        if self.ckpt_step is not None:
            require(self.ckpt_step >= 0, f"--ckpt-step must be non-negative, got "
                                         f"{self.ckpt_step}")
            require(not self.load_fallback, "--ckpt-step names the iteration to load; it "
                                            "cannot be combined with --load-fallback")


@dataclass
class LoggingConfig:
    """Console log line, TensorBoard and the per-iteration JSONL metrics."""

    log_interval: int = setting(10, "--log-interval", "Iterations between log lines.")
    tensorboard_dir: Optional[str] = setting(None, "--tensorboard-dir",
                                             "Write TensorBoard events here.")
    metrics_jsonl: Optional[str] = setting(
        None, "--metrics-jsonl", "Append one JSON object of metrics per iteration to this file.",
        metavar="PATH")
    timing_log_level: int = setting(
        0, "--timing-log-level", "Stage timers: 0 off; 1 or 2 time forward-backward, the "
        "gradient all-reduce wait, the optimizer and the MoE all-to-all / experts / compression "
        "per iteration (metrics JSONL 'timers', and a line at each log interval).",
        choices=(0, 1, 2))

    def __post_init__(self):
        check_positive(self, "log_interval")
        check_choice(self, "timing_log_level")


SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "parallel": ParallelConfig,
            "optimizer": OptimizerConfig, "training": TrainingConfig, "data": DataConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig}
"""Section name -> config class, in the order of ``MegatronLSHConfig``'s fields."""


@dataclass
class MegatronLSHConfig:
    """A whole run: one config per component; cross-section checks run here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if self.training.train_iters is not None:
            self.optimizer.schedule_iters(self.training.train_iters)
        require(not (self.data.mock_data and (self.data.data_path or self.data.train_data_path)),
                "--mock-data generates its own documents; it cannot be combined with "
                "--data-path / --train-data-path")
        o = self.optimizer
        if self.training.train_samples is None:
            require(not (o.lr_warmup_samples or o.lr_decay_samples),
                    "--lr-warmup-samples / --lr-decay-samples need --train-samples "
                    "(with --train-iters use --lr-warmup-iters / --lr-decay-iters)")
        else:
            require(not (o.lr_warmup_iters or o.lr_decay_iters),
                    "with --train-samples the schedule is in samples: use --lr-warmup-samples "
                    "/ --lr-decay-samples (or --lr-warmup-fraction)")

    def resolved_for_batch(self, global_batch_size: int) -> "MegatronLSHConfig":
        """This config with a sample-based length (``--train-samples``, ``--lr-*-samples``)
        turned into iterations at ``global_batch_size`` (itself when it has none): the run takes
        ``train_samples // global_batch_size`` steps, and the schedule's warmup and decay lengths
        become fractional iterations, so the learning rate at each step is Megatron's at the
        samples consumed by then."""
        tr, o = self.training, self.optimizer
        if tr.train_samples is None:
            return self
        iters = tr.train_samples // global_batch_size
        require(iters > 0, f"--train-samples ({tr.train_samples}) is smaller than one global "
                           f"batch ({global_batch_size} samples)")
        training = dataclasses.replace(tr, train_samples=None, train_iters=iters)
        optimizer = dataclasses.replace(
            o, lr_warmup_samples=0, lr_decay_samples=None,
            lr_warmup_iters=o.lr_warmup_samples / global_batch_size,
            lr_decay_iters=(o.lr_decay_samples or tr.train_samples) / global_batch_size)
        return dataclasses.replace(self, training=training, optimizer=optimizer)

    def to_dict(self) -> dict:
        """Plain nested dict (stored in checkpoints and logs)."""
        return asdict(self)
