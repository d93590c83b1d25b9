"""Megatron-compatible command-line flags -> :class:`~megatron_lsh.config.MegatronLSHConfig`.

The flags keep Megatron-LM's names and meanings; they are only the outer skin of the typed
configs. Every flag's parser default is "not given" (``argparse.SUPPRESS``), so a field that no
flag and no entry-point default sets keeps the dataclass default: ``config.py`` stays the one
place where defaults live (``--help`` shows them).

Precedence, lowest first: dataclass defaults, ``defaults`` (a recipe chosen by the entry
point, keyed by the flags' ``dest`` names, e.g. ``{"num_layers": 12}``), the command line.
Any invalid value ends in ``parser.error`` with one sentence (argparse exits with status 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, Callable, Optional, Sequence

from megatron_lsh.config import (CheckpointConfig, ConfigError, DataConfig, LoggingConfig,
                                 MegatronLSHConfig, ModelConfig, MoEConfig, OptimizerConfig,
                                 ParallelConfig, TrainingConfig)
from megatron_lsh.tokenizer import TOKENIZER_TYPES
from megatron_lsh.training.lr_schedule import resolve_schedule

_SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "parallel": ParallelConfig,
             "optimizer": OptimizerConfig, "training": TrainingConfig, "data": DataConfig,
             "checkpoint": CheckpointConfig, "logging": LoggingConfig}

# dest -> (section, field, value converter). Flags whose meaning is not a plain copy
# (``--swiglu`` sets the activation, ``--disable-bias-linear`` clears add_bias_linear, ...)
# carry a converter; every dest here is also a key that ``defaults`` may use.
_FIELDS: dict[str, tuple[str, str, Optional[Callable[[Any], Any]]]] = {}


def _add(group, flag: str, section: str, field: str, help: str, *,
         convert: Optional[Callable[[Any], Any]] = None, show_default: bool = True, **kwargs):
    """Add one flag to ``group`` and record where its value goes."""
    dest = flag.lstrip("-").replace("-", "_")
    if show_default and kwargs.get("action") not in ("store_true", "store_false"):
        default = _field_default(section, field)
        if default is not None:
            help = f"{help} (default: {default})"
    group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=help, **kwargs)
    _FIELDS[dest] = (section, field, convert)


def _field_default(section: str, field: str):
    for f in dataclasses.fields(_SECTIONS[section]):
        if f.name == field:
            if f.default is not dataclasses.MISSING:
                return f.default
            return None
    raise AssertionError(f"config field {section}.{field} does not exist")


def _model_flags(parser):
    g = parser.add_argument_group("model shape")
    _add(g, "--num-layers", "model", "num_layers", "Transformer layers (T5: encoder layers).",
         type=int)
    _add(g, "--hidden-size", "model", "hidden_size", "Width of the residual stream.", type=int)
    _add(g, "--ffn-hidden-size", "model", "ffn_hidden_size",
         "Width of the MLP / each expert; 4 x hidden-size when not given.", type=int)
    _add(g, "--num-attention-heads", "model", "num_attention_heads", "Attention heads.", type=int)
    _add(g, "--kv-channels", "model", "kv_channels",
         "Width of each attention head; hidden-size / num-attention-heads when not given.",
         type=int)
    _add(g, "--seq-length", "model", "seq_length", "Tokens per sample (T5: encoder length).",
         type=int)
    _add(g, "--max-position-embeddings", "model", "max_position_embeddings",
         "Rows of the learned position table; seq-length when not given.", type=int)
    _add(g, "--decoder-num-layers", "model", "decoder_num_layers",
         "T5 decoder layers; num-layers when not given.", type=int)
    _add(g, "--decoder-seq-length", "model", "decoder_seq_length",
         "T5 decoder length; seq-length / 4 when not given.", type=int)
    _add(g, "--vocab-size", "model", "vocab_size",
         "Vocabulary size for the NullTokenizer (others take it from the tokenizer).", type=int)
    _add(g, "--make-vocab-size-divisible-by", "model", "make_vocab_size_divisible_by",
         "Pad the vocabulary to a multiple of this times tensor-model-parallel-size.", type=int)
    _add(g, "--hidden-dropout", "model", "hidden_dropout", "Dropout on hidden states.", type=float)
    _add(g, "--attention-dropout", "model", "attention_dropout",
         "Dropout on attention probabilities.", type=float)
    _add(g, "--init-method-std", "model", "init_method_std",
         "Standard deviation of the normal weight initialisation.", type=float)
    _add(g, "--layernorm-epsilon", "model", "layernorm_epsilon", "LayerNorm epsilon.", type=float)
    _add(g, "--disable-bias-linear", "model", "add_bias_linear",
         "Drop the biases of all linear layers.", action="store_true", convert=lambda v: not v)
    _add(g, "--untie-embeddings-and-output-weights", "model", "untie_embeddings_and_output_weights",
         "Use a separate output layer instead of the input embedding.", action="store_true")
    _add(g, "--swiglu", "model", "activation", "Use a SwiGLU MLP instead of GeLU.",
         action="store_true", convert=lambda v: "swiglu" if v else "gelu")
    _add(g, "--recompute-granularity", "model", "recompute_granularity",
         "Activation recomputation: whole layers (full) or the attention core (selective).",
         choices=["full", "selective"])


def _parallel_flags(parser):
    g = parser.add_argument_group("parallelism")
    _add(g, "--tensor-model-parallel-size", "parallel", "tensor_model_parallel_size",
         "Ranks that split each layer's weights.", type=int)
    _add(g, "--pipeline-model-parallel-size", "parallel", "pipeline_model_parallel_size",
         "Pipeline stages.", type=int)
    _add(g, "--expert-model-parallel-size", "parallel", "expert_model_parallel_size",
         "Ranks that split the experts of each MoE layer.", type=int)
    _add(g, "--sequence-parallel", "parallel", "sequence_parallel",
         "Split LayerNorm and dropout activations along the sequence over the TP group.",
         action="store_true")
    _add(g, "--distributed-backend", "parallel", "distributed_backend",
         "torch.distributed backend; nccl when CUDA is available, else gloo, when not given.",
         choices=["nccl", "gloo"])
    _add(g, "--distributed-timeout-minutes", "parallel", "distributed_timeout_minutes",
         "Timeout of collective operations.", type=int)
    _add(g, "--use-distributed-optimizer", "parallel", "use_distributed_optimizer",
         "Shard the optimizer state over data-parallel ranks (ZeRO-1).", action="store_true")


def _moe_flags(parser):
    g = parser.add_argument_group("mixture of experts")
    _add(g, "--num-experts", "moe", "num_experts", "Experts per MoE layer; 0 is a dense model.",
         type=int)
    _add(g, "--moe-layer-freq", "moe", "moe_layer_freq", "Every k-th layer is a MoE layer.",
         type=int)
    _add(g, "--moe-router-topk", "moe", "router_topk", "Experts each token is routed to.", type=int)
    _add(g, "--moe-expert-capacity-factor", "moe", "capacity_factor",
         "Expert capacity as a multiple of the even share; dropless when not given.", type=float)
    _add(g, "--moe-aux-loss-coeff", "moe", "aux_loss_coeff", "Load-balancing loss weight.",
         type=float)
    _add(g, "--moe-z-loss-coeff", "moe", "z_loss_coeff", "Router z-loss weight.", type=float)
    _add(g, "--moe-a2a-compression", "moe", "a2a_compression",
         "All-to-all payload: dense rows (none), LSH centroids (lsh) or low-precision rows (cast).",
         choices=["none", "lsh", "cast"])
    _add(g, "--moe-lsh-num-hashes", "moe", "lsh_num_hashes",
         "LSH functions concatenated into one bucket key (L).", type=int)
    _add(g, "--moe-lsh-hash-type", "moe", "lsh_hash_type", "LSH family.",
         choices=["cross_polytope", "spherical_plane"])
    _add(g, "--moe-lsh-rotation-dim", "moe", "lsh_rotation_dim",
         "Width m of each random rotation (codes take 2m values).", type=int)
    _add(g, "--moe-lsh-no-compensation", "moe", "lsh_compensation",
         "Restore rows as E(c) without the residual x - c.", action="store_true",
         convert=lambda v: not v)
    _add(g, "--moe-lsh-redraw-interval", "moe", "lsh_redraw_interval",
         "Redraw the LSH rotations every N iterations (0: never).", type=int)
    _add(g, "--moe-cast-dtype", "moe", "cast_dtype", "Wire dtype of the cast compressor.",
         choices=["bf16", "fp8"])


def _optimizer_flags(parser):
    g = parser.add_argument_group("optimizer and learning rate")
    _add(g, "--lr", "optimizer", "lr", "Peak learning rate.", type=float)
    _add(g, "--min-lr", "optimizer", "min_lr", "Learning rate at the end of the decay.", type=float)
    _add(g, "--lr-decay-style", "optimizer", "lr_decay_style", "Learning-rate decay shape.",
         choices=["constant", "linear", "cosine"])
    _add(g, "--lr-decay-iters", "optimizer", "lr_decay_iters",
         "Iterations over which the learning rate decays; train-iters when not given.", type=int)
    _add(g, "--lr-warmup-iters", "optimizer", "lr_warmup_iters",
         "Linear warmup iterations.", type=int)
    _add(g, "--lr-warmup-fraction", "optimizer", "lr_warmup_fraction",
         "Warmup as a fraction of lr-decay-iters (instead of lr-warmup-iters).", type=float)
    _add(g, "--weight-decay", "optimizer", "weight_decay", "AdamW weight decay.", type=float)
    _add(g, "--clip-grad", "optimizer", "clip_grad", "Clip the global gradient norm (0: off).",
         type=float)
    _add(g, "--adam-beta1", "optimizer", "adam_beta1", "Adam beta1.", type=float)
    _add(g, "--adam-beta2", "optimizer", "adam_beta2", "Adam beta2.", type=float)
    _add(g, "--adam-eps", "optimizer", "adam_eps", "Adam epsilon.", type=float)
    _add(g, "--bf16", "optimizer", "bf16", "Train in bfloat16 with fp32 master weights.",
         action="store_true")
    _add(g, "--fp16", "optimizer", "fp16", "Train in float16 with dynamic loss scaling.",
         action="store_true")
    _add(g, "--initial-loss-scale", "optimizer", "initial_loss_scale",
         "Starting dynamic loss scale (fp16).", type=float)
    _add(g, "--min-loss-scale", "optimizer", "min_loss_scale", "Smallest dynamic loss scale.",
         type=float)
    _add(g, "--loss-scale-window", "optimizer", "loss_scale_window",
         "Clean iterations before the loss scale grows.", type=int)
    _add(g, "--hysteresis", "optimizer", "hysteresis",
         "Overflows tolerated before the loss scale shrinks.", type=int)


def _training_flags(parser):
    g = parser.add_argument_group("training")
    _add(g, "--micro-batch-size", "training", "micro_batch_size",
         "Samples per forward/backward on one data-parallel rank.", type=int)
    _add(g, "--global-batch-size", "training", "global_batch_size",
         "Samples per optimizer step (accumulates micro-batches); "
         "micro-batch-size x data-parallel-size when not given.", type=int)
    _add(g, "--train-iters", "training", "train_iters", "Optimizer steps to train for.", type=int)
    _add(g, "--seed", "training", "seed", "Random seed.", type=int)
    _add(g, "--eval-interval", "training", "eval_interval",
         "Iterations between validation runs.", type=int)
    _add(g, "--eval-iters", "training", "eval_iters", "Batches per validation run.", type=int)
    _add(g, "--exit-signal-handler", "training", "exit_signal_handler",
         "On SIGTERM, save a checkpoint at the end of the iteration and exit.", action="store_true")
    _add(g, "--exit-interval", "training", "exit_interval",
         "Save and exit when the iteration is a multiple of this.", type=int)
    _add(g, "--exit-duration-in-mins", "training", "exit_duration_in_mins",
         "Save and exit after this many minutes of training.", type=float)


def _data_flags(parser):
    g = parser.add_argument_group("data and tokenizer")
    _add(g, "--data-path", "data", "data_path",
         "Dataset prefixes, optionally weighted: 'P' or 'W1 P1 W2 P2 ...'.", nargs="+",
         show_default=False)
    for part in ("train", "valid", "test"):
        _add(g, f"--{part}-data-path", "data", f"{part}_data_path",
             f"Separate {part} prefixes (instead of --data-path cut by --split).", nargs="+",
             show_default=False)
    _add(g, "--split", "data", "split", "Train, validation, test weights.")
    _add(g, "--data-cache-path", "data", "data_cache_path",
         "Folder for the sample indices; next to the data when not given.")
    _add(g, "--tokenizer-type", "data", "tokenizer_type", "Tokenizer.", choices=TOKENIZER_TYPES)
    _add(g, "--vocab-file", "data", "vocab_file", "Tokenizer vocabulary file.")
    _add(g, "--merge-file", "data", "merge_file", "BPE merges file.")
    _add(g, "--tokenizer-model", "data", "tokenizer_model",
         "SentencePiece model or Hugging Face tokenizer.json.")
    _add(g, "--vocab-extra-ids", "data", "vocab_extra_ids", "T5 sentinel tokens to add.", type=int)
    _add(g, "--mask-prob", "data", "mask_prob", "Fraction of tokens masked (MLM, T5).", type=float)
    _add(g, "--num-workers", "data", "num_workers", "Data-loader worker processes.", type=int)


def _checkpoint_and_logging_flags(parser):
    g = parser.add_argument_group("checkpointing")
    _add(g, "--save", "checkpoint", "save", "Folder to save checkpoints in.")
    _add(g, "--load", "checkpoint", "load", "Folder to resume from (scratch if it is absent).")
    _add(g, "--save-interval", "checkpoint", "save_interval",
         "Iterations between checkpoints.", type=int)
    _add(g, "--finetune", "checkpoint", "finetune",
         "Load only the model weights and restart at iteration 0.", action="store_true")
    _add(g, "--no-load-optim", "checkpoint", "no_load_optim",
         "Do not load the optimizer state.", action="store_true")
    _add(g, "--no-load-rng", "checkpoint", "no_load_rng", "Do not load the RNG states.",
         action="store_true")
    g = parser.add_argument_group("logging")
    _add(g, "--log-interval", "logging", "log_interval", "Iterations between log lines.", type=int)
    _add(g, "--tensorboard-dir", "logging", "tensorboard_dir", "Write TensorBoard events here.")
    _add(g, "--metrics-jsonl", "logging", "metrics_jsonl",
         "Append one JSON object of metrics per iteration to this file.", metavar="PATH")


def build_parser(extra_args_provider: Optional[Callable[[argparse.ArgumentParser],
                                                        argparse.ArgumentParser]] = None
                 ) -> argparse.ArgumentParser:
    """The parser of every Megatron flag this project supports (plus an entry point's own).

    ``extra_args_provider(parser) -> parser`` adds flags the way Megatron entry points do;
    their values come back in the namespace of :func:`parse_args_with_namespace`.
    """
    parser = argparse.ArgumentParser(
        description="Megatron-style MoE pretraining with an LSH-compressed expert all-to-all.",
        usage="%(prog)s [flags] (all flags: --help)", allow_abbrev=False)
    for add in (_model_flags, _parallel_flags, _moe_flags, _optimizer_flags, _training_flags,
                _data_flags, _checkpoint_and_logging_flags):
        add(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


def _check_data_path(paths: Sequence[str]) -> None:
    """Either prefixes only, or alternating 'weight prefix' pairs with non-negative weights."""
    def is_number(text):
        try:
            float(text)
            return True
        except ValueError:
            return False

    if not paths or not is_number(paths[0]):
        if len(paths) > 1:
            raise ConfigError(f"--data-path with several prefixes needs a weight before each "
                              f"one ('W1 P1 W2 P2 ...'), got {' '.join(paths)!r}")
        return
    if len(paths) % 2 or not all(is_number(w) for w in paths[0::2]):
        raise ConfigError(f"--data-path must alternate weights and prefixes "
                          f"('W1 P1 W2 P2 ...'), got {' '.join(paths)!r}")
    weights = [float(w) for w in paths[0::2]]
    if min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(f"--data-path weights must be non-negative with a positive sum, "
                          f"got {weights}")


def _check_cross_fields(given: dict, config: MegatronLSHConfig) -> None:
    """Checks that span sections or flags with no dataclass check; one sentence each."""
    if "lr_warmup_fraction" in given and given.get("lr_warmup_iters", 0):
        raise ConfigError("--lr-warmup-iters and --lr-warmup-fraction cannot both be set")
    t = config.training
    if t.global_batch_size is not None and t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"--global-batch-size ({t.global_batch_size}) is not divisible by "
                          f"--micro-batch-size ({t.micro_batch_size})")
    if t.exit_interval is not None and t.exit_interval <= 0:
        raise ConfigError(f"--exit-interval must be positive, got {t.exit_interval}")
    if t.exit_duration_in_mins is not None and t.exit_duration_in_mins <= 0:
        raise ConfigError(f"--exit-duration-in-mins must be positive, got "
                          f"{t.exit_duration_in_mins}")
    o = config.optimizer
    if o.lr_decay_iters is not None and o.lr_decay_iters <= 0:
        raise ConfigError(f"--lr-decay-iters must be positive, got {o.lr_decay_iters}")
    if o.adam_eps <= 0:
        raise ConfigError(f"--adam-eps must be positive, got {o.adam_eps}")
    m = config.model
    if m.layernorm_epsilon <= 0:
        raise ConfigError(f"--layernorm-epsilon must be positive, got {m.layernorm_epsilon}")
    if m.kv_channels is not None and m.kv_channels <= 0:
        raise ConfigError(f"--kv-channels must be positive, got {m.kv_channels}")
    if m.decoder_num_layers <= 0 or m.decoder_seq_length <= 0:
        raise ConfigError(f"--decoder-num-layers and --decoder-seq-length must be positive, got "
                          f"{m.decoder_num_layers} and {m.decoder_seq_length}")
    resolve_schedule(config.optimizer, t.train_iters)
    d = config.data
    for paths in (d.data_path, d.train_data_path, d.valid_data_path, d.test_data_path):
        if paths:
            _check_data_path(paths)
    if d.data_path and (d.train_data_path or d.valid_data_path or d.test_data_path):
        raise ConfigError("give either --data-path (cut by --split) or --train-data-path / "
                          "--valid-data-path / --test-data-path, not both")


def config_from_namespace(namespace: argparse.Namespace,
                          defaults: Optional[dict] = None) -> MegatronLSHConfig:
    """Build the config from parsed flags over ``defaults`` (dest-keyed); raises ConfigError."""
    if not _FIELDS:
        build_parser()  # records where every flag's value goes
    unknown = sorted(set(defaults or {}) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"defaults has keys that are not flag names: {', '.join(unknown)}")
    given = dict(defaults or {})
    given.update({k: v for k, v in vars(namespace).items() if k in _FIELDS})
    sections: dict[str, dict] = {name: {} for name in _SECTIONS}
    for dest, value in given.items():
        section, field, convert = _FIELDS[dest]
        if convert is not None:
            # A store_true flag given as False in defaults means "off": no change to the field.
            if isinstance(value, bool) and not value:
                continue
            value = convert(value)
        sections[section][field] = value
    config = MegatronLSHConfig(**{name: cls(**sections[name]) for name, cls in _SECTIONS.items()})
    _check_cross_fields(given, config)
    return config


def _with_flag_names(message: str) -> str:
    """Rewrite config field names in an error message as the flags that set them."""
    names = {}
    for dest, (section, field, _) in _FIELDS.items():
        flag = "--" + dest.replace("_", "-")
        names[dest] = flag
        names.setdefault(field, flag)
    alternatives = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    pattern = r"(?<![\w-])(" + alternatives + r")(?![\w-])"  # whole names, not parts of flags
    return re.sub(pattern, lambda m: names[m.group(1)], message)


def parse_args_with_namespace(argv: Optional[Sequence[str]] = None,
                              defaults: Optional[dict] = None,
                              extra_args_provider: Optional[Callable] = None
                              ) -> tuple[MegatronLSHConfig, argparse.Namespace]:
    """Parse ``argv`` (sys.argv[1:] when None) into a config and the raw namespace.

    The namespace holds only flags given on the command line plus every flag added by
    ``extra_args_provider`` (with its own defaults). A bad value ends in ``parser.error``.
    """
    parser = build_parser(extra_args_provider)
    namespace = parser.parse_args(argv)
    try:
        config = config_from_namespace(namespace, defaults)
    except ConfigError as error:
        parser.error(_with_flag_names(str(error)))
    return config, namespace


def parse_args(argv: Optional[Sequence[str]] = None, defaults: Optional[dict] = None, *,
               extra_args_provider: Optional[Callable] = None) -> MegatronLSHConfig:
    """Parse Megatron-style flags into a :class:`MegatronLSHConfig` (see the module docstring)."""
    return parse_args_with_namespace(argv, defaults, extra_args_provider)[0]
