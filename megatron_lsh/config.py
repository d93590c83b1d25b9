"""Typed, nested configuration for every component, validated on construction.

Each component takes its own dataclass (``ModelConfig``, ``MoEConfig``, ...); the whole run is a
``MegatronLSHConfig`` made of them. Megatron's command-line flag names are only the outer skin
(``arguments.py`` maps flags to these fields). Every check raises :class:`ConfigError` with one
sentence that names the field and the offending value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """An invalid setting; the message is one sentence naming the field(s) and value(s)."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _positive(name: str, value) -> None:
    _require(value is not None and value > 0, f"{name} must be positive, got {value}")


def _non_negative(name: str, value) -> None:
    _require(value is not None and value >= 0, f"{name} must be non-negative, got {value}")


def _probability(name: str, value: float) -> None:
    _require(0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value}")


def _choice(name: str, value, choices) -> None:
    _require(value in choices,
             f"{name} must be one of {sorted(map(repr, choices))}, got {value!r}")


@dataclass
class ModelConfig:
    """Transformer shape and initialisation."""

    num_layers: int = 2
    """Transformer layers (for T5: encoder layers; see ``decoder_num_layers``)."""
    hidden_size: int = 64
    ffn_hidden_size: Optional[int] = None
    """FFN width; defaults to 4 * hidden_size."""
    num_attention_heads: int = 4
    kv_channels: Optional[int] = None
    """Per-head width; defaults to hidden_size / num_attention_heads."""
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None
    """Learned position table size; defaults to seq_length."""
    decoder_num_layers: Optional[int] = None
    """T5 decoder layers; defaults to num_layers."""
    decoder_seq_length: Optional[int] = None
    """T5 decoder length; defaults to seq_length // 4 (at least 1)."""
    vocab_size: int = 50257
    """Tokenizer vocabulary; the embedding is padded to a multiple of the divisor * tp."""
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    layernorm_epsilon: float = 1e-5
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    activation: str = "gelu"
    recompute_granularity: Optional[str] = None
    """None, 'full' (whole layers) or 'selective' (attention core only)."""

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.decoder_num_layers is None:
            self.decoder_num_layers = self.num_layers
        if self.decoder_seq_length is None:
            self.decoder_seq_length = max(1, self.seq_length // 4)
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "seq_length", "vocab_size", "make_vocab_size_divisible_by",
                     "max_position_embeddings"):
            _positive(name, getattr(self, name))
        _require(self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
                 f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                 f"({self.num_attention_heads})")
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        _probability("hidden_dropout", self.hidden_dropout)
        _probability("attention_dropout", self.attention_dropout)
        _positive("init_method_std", self.init_method_std)
        _choice("activation", self.activation, {"gelu", "relu", "swiglu"})
        _choice("recompute_granularity", self.recompute_granularity, {None, "full", "selective"})
        _require(self.max_position_embeddings >= self.seq_length,
                 f"max_position_embeddings ({self.max_position_embeddings}) is smaller than "
                 f"seq_length ({self.seq_length})")


@dataclass
class MoEConfig:
    """Mixture-of-Experts layers, router and the all-to-all compression (DESIGN.md section 4)."""

    num_experts: int = 0
    """Experts per MoE layer; 0 means a dense model."""
    moe_layer_freq: int = 2
    """Every k-th transformer layer is MoE (the paper: every 2nd)."""
    router_topk: int = 2
    capacity_factor: Optional[float] = None
    """Expert capacity as a multiple of the even share; None is dropless."""
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    a2a_compression: str = "none"
    """'none' (dense baseline), 'lsh' (send centroids) or 'cast' (bf16 / fp8 rows)."""
    lsh_num_hashes: int = 6
    """L: hash functions whose codes form one bucket key (the paper's default is 6)."""
    lsh_hash_type: str = "cross_polytope"
    """'cross_polytope' or 'spherical_plane' (the paper's ablation)."""
    lsh_rotation_dim: int = 1
    """m: width of each random rotation (codes take 2m values). Measured on Shakespeare hidden
    states (bench/moe_layer.py): with L=6, m=1 sends ~6% of the rows, m=2 already ~55%."""
    lsh_compensation: bool = True
    """Residual compensation: restore each row as E(c) + (x - c)."""
    lsh_redraw_interval: int = 0
    """Redraw the rotations every N iterations (0: never)."""
    lsh_seed: int = 1234
    cast_dtype: str = "bf16"
    """Wire dtype of the 'cast' compressor: 'bf16' or 'fp8' (e4m3 with a per-row scale)."""

    @property
    def enabled(self) -> bool:
        """True when the model has MoE layers."""
        return self.num_experts > 0

    def __post_init__(self):
        _non_negative("num_experts", self.num_experts)
        _positive("moe_layer_freq", self.moe_layer_freq)
        _positive("router_topk", self.router_topk)
        if self.num_experts > 0:
            _require(self.router_topk <= self.num_experts,
                     f"moe_router_topk ({self.router_topk}) exceeds num_experts "
                     f"({self.num_experts})")
        if self.capacity_factor is not None:
            _positive("moe_expert_capacity_factor", self.capacity_factor)
        _non_negative("moe_aux_loss_coeff", self.aux_loss_coeff)
        _non_negative("moe_z_loss_coeff", self.z_loss_coeff)
        _choice("moe_a2a_compression", self.a2a_compression, {"none", "lsh", "cast"})
        _positive("moe_lsh_num_hashes", self.lsh_num_hashes)
        _choice("moe_lsh_hash_type", self.lsh_hash_type, {"cross_polytope", "spherical_plane"})
        _positive("moe_lsh_rotation_dim", self.lsh_rotation_dim)
        _non_negative("moe_lsh_redraw_interval", self.lsh_redraw_interval)
        _choice("moe_cast_dtype", self.cast_dtype, {"bf16", "fp8"})


@dataclass
class ParallelConfig:
    """Parallel layout: world = pp * dp * tp; EP is carved out of the dp * tp ranks of a stage."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    data_parallel_size: Optional[int] = None
    """Derived from the world size when None."""
    sequence_parallel: bool = False
    distributed_backend: Optional[str] = None
    """'nccl' or 'gloo'; None picks nccl when CUDA is available, else gloo."""
    distributed_timeout_minutes: int = 10
    use_distributed_optimizer: bool = False
    """ZeRO-1: shard optimizer state over data-parallel ranks."""
    num_microbatches_in_flight: Optional[int] = None
    pipeline_schedule: str = "1f1b"
    """'1f1b' or 'afab' (all-forward-all-backward)."""
    grad_bucket_size_mb: float = 25.0

    def __post_init__(self):
        _positive("tensor_model_parallel_size", self.tensor_model_parallel_size)
        _positive("pipeline_model_parallel_size", self.pipeline_model_parallel_size)
        _positive("expert_model_parallel_size", self.expert_model_parallel_size)
        if self.data_parallel_size is not None:
            _positive("data_parallel_size", self.data_parallel_size)
        _choice("distributed_backend", self.distributed_backend, {None, "nccl", "gloo"})
        _positive("distributed_timeout_minutes", self.distributed_timeout_minutes)
        _choice("pipeline_schedule", self.pipeline_schedule, {"1f1b", "afab"})
        _positive("grad_bucket_size_mb", self.grad_bucket_size_mb)


@dataclass
class OptimizerConfig:
    """AdamW, learning-rate schedule, mixed precision and loss scaling, clipping."""

    lr: float = 1e-3
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    bf16: bool = False
    fp16: bool = False
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2

    def __post_init__(self):
        _non_negative("lr", self.lr)
        _non_negative("min_lr", self.min_lr)
        _require(self.min_lr <= self.lr, f"min_lr ({self.min_lr}) exceeds lr ({self.lr})")
        _choice("lr_decay_style", self.lr_decay_style, {"constant", "linear", "cosine"})
        _non_negative("lr_warmup_iters", self.lr_warmup_iters)
        if self.lr_warmup_fraction is not None:
            _require(0.0 <= self.lr_warmup_fraction <= 1.0,
                     f"lr_warmup_fraction must be in [0, 1], got {self.lr_warmup_fraction}")
        _non_negative("weight_decay", self.weight_decay)
        _probability("adam_beta1", self.adam_beta1)
        _probability("adam_beta2", self.adam_beta2)
        _non_negative("clip_grad", self.clip_grad)
        _require(not (self.bf16 and self.fp16), "bf16 and fp16 cannot both be set")
        _positive("initial_loss_scale", self.initial_loss_scale)
        _positive("min_loss_scale", self.min_loss_scale)
        _positive("loss_scale_window", self.loss_scale_window)
        _positive("hysteresis", self.hysteresis)


@dataclass
class TrainingConfig:
    """Batch sizes, iteration counts and the exit conditions of the loop."""

    micro_batch_size: int = 2
    global_batch_size: Optional[int] = None
    """Defaults to micro_batch_size * data_parallel_size (no accumulation)."""
    train_iters: int = 100
    seed: int = 1234
    eval_interval: int = 100
    eval_iters: int = 10
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    exit_signal_handler: bool = False

    def __post_init__(self):
        _positive("micro_batch_size", self.micro_batch_size)
        if self.global_batch_size is not None:
            _positive("global_batch_size", self.global_batch_size)
        _positive("train_iters", self.train_iters)
        _positive("eval_interval", self.eval_interval)
        _non_negative("eval_iters", self.eval_iters)


@dataclass
class DataConfig:
    """Datasets and tokenizer."""

    data_path: list = field(default_factory=list)
    """Prefixes, optionally with weights: ['0.7', 'a_text_document', '0.3', 'b_text_document']."""
    train_data_path: list = field(default_factory=list)
    """Separate training prefixes (instead of cutting data_path by split)."""
    valid_data_path: list = field(default_factory=list)
    test_data_path: list = field(default_factory=list)
    split: str = "949,50,1"
    data_cache_path: Optional[str] = None
    tokenizer_type: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tokenizer_model: Optional[str] = None
    vocab_extra_ids: int = 0
    mask_prob: float = 0.15
    short_seq_prob: float = 0.0
    num_workers: int = 0

    def __post_init__(self):
        parts = self.split.replace("/", ",").split(",")
        _require(all(p.strip().replace(".", "", 1).isdigit() for p in parts) and len(parts) <= 3
                 and sum(float(p) for p in parts) > 0,
                 f"split must be up to three non-negative weights like '949,50,1', got {self.split!r}")
        _non_negative("vocab_extra_ids", self.vocab_extra_ids)
        _probability("mask_prob", self.mask_prob)
        _non_negative("num_workers", self.num_workers)


@dataclass
class CheckpointConfig:
    """Where and when to save; what to load."""

    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False

    def __post_init__(self):
        if self.save_interval is not None:
            _positive("save_interval", self.save_interval)


@dataclass
class LoggingConfig:
    """Console log line, TensorBoard and the per-iteration JSONL metrics."""

    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    metrics_jsonl: Optional[str] = None

    def __post_init__(self):
        _positive("log_interval", self.log_interval)


@dataclass
class MegatronLSHConfig:
    """A whole run: one config per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (stored in checkpoints and logs)."""
        return asdict(self)
