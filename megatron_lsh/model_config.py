"""The model's settings: the transformer's shape and options (:class:`ModelConfig`) and its
Mixture-of-Experts layers (:class:`MoEConfig`).

Declared like every other section of the run's config (see :mod:`megatron_lsh.config`, which
re-exports both); kept apart because they are the settings a model is built from, while the
rest of the config describes how a run trains it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatron_lsh.settings import (ConfigError, _derive, check_choice, check_non_negative,
                                   check_positive, check_probability, parse_int_tuple,
                                   parse_layer_list, parse_moe_layer_freq, require, setting)

__all__ = ["ModelConfig", "MoEConfig"]


@dataclass
class ModelConfig:
    """Transformer shape and initialisation."""

    num_layers: int = setting(2, "--num-layers", "Transformer layers (T5: encoder layers).",
                              flag_aliases=("--encoder-num-layers",))
    hidden_size: int = setting(64, "--hidden-size", "Width of the residual stream.")
    ffn_hidden_size: Optional[int] = setting(
        None, "--ffn-hidden-size",
        "Width of the MLP / each expert; 4 x hidden-size when not given (--swiglu: see there).")
    num_attention_heads: int = setting(4, "--num-attention-heads", "Attention heads.")
    kv_channels: Optional[int] = setting(
        None, "--kv-channels",
        "Width of each attention head; hidden-size / num-attention-heads when not given.")
    seq_length: int = setting(128, "--seq-length", "Tokens per sample (T5: encoder length).",
                              flag_aliases=("--encoder-seq-length",))
    max_position_embeddings: Optional[int] = setting(
        None, "--max-position-embeddings", "Rows of the learned position table; seq-length "
        "when not given.")
    decoder_num_layers: Optional[int] = setting(
        None, "--decoder-num-layers", "T5 decoder layers; num-layers when not given.")
    decoder_seq_length: Optional[int] = setting(
        None, "--decoder-seq-length", "T5 decoder length; seq-length / 4 when not given.")
    vocab_size: int = setting(
        50257, "--vocab-size",
        "Vocabulary size for the NullTokenizer (others take it from the tokenizer).")
    make_vocab_size_divisible_by: int = setting(
        128, "--make-vocab-size-divisible-by",
        "Pad the vocabulary to a multiple of this times tensor-model-parallel-size.")
    hidden_dropout: float = setting(0.1, "--hidden-dropout", "Dropout on hidden states.")
    attention_dropout: float = setting(0.1, "--attention-dropout",
                                       "Dropout on attention probabilities.")
    init_method_std: float = setting(0.02, "--init-method-std",
                                     "Standard deviation of the normal weight initialisation.")
    layernorm_epsilon: float = setting(1e-5, "--norm-epsilon",
                                       "Epsilon of every LayerNorm / RMSNorm.",
                                       flag_aliases=("--layernorm-epsilon",))
    normalization: str = setting("LayerNorm", "--normalization",
                                 "Normalisation layer of the transformer.",
                                 choices=("LayerNorm", "RMSNorm"))
    position_embedding_type: str = setting(
        "learned_absolute", "--position-embedding-type",
        "Positions: a learned table added to the embedding, rotary (RoPE) on queries and keys "
        "of self-attention, or none.", choices=("learned_absolute", "rope", "none"),
        aliases={"--use-rotary-position-embeddings": "rope"})
    add_position_embedding: bool = setting(
        True, "--no-position-embedding",
        "No learned position table (with learned_absolute positions: no positions at all, "
        "as in Megatron; with rope it changes nothing).")
    rotary_base: int = setting(10000, "--rotary-base", "RoPE base period.")
    rotary_percent: float = setting(1.0, "--rotary-percent",
                                    "Fraction of each head's channels that RoPE rotates.")
    group_query_attention: bool = setting(
        False, "--group-query-attention", "Grouped-query attention: --num-query-groups key / "
        "value heads, each shared by num-attention-heads / num-query-groups query heads.")
    num_query_groups: Optional[int] = setting(
        None, "--num-query-groups", "Key / value heads with --group-query-attention "
        "(otherwise one per attention head).")
    add_bias_linear: bool = setting(True, "--disable-bias-linear",
                                    "Drop the biases of all linear layers.")
    untie_embeddings_and_output_weights: bool = setting(
        False, "--untie-embeddings-and-output-weights",
        "Use a separate output layer instead of the input embedding.")
    activation: str = setting("gelu", "--swiglu", "Use a SwiGLU MLP instead of GeLU (without "
                              "--ffn-hidden-size the width is Megatron's 4h x 2/3, rounded down "
                              "to a multiple of 64).",
                              const="swiglu", choices=("gelu", "relu", "swiglu"))
    recompute_granularity: Optional[str] = setting(
        None, "--recompute-granularity",
        "Activation recomputation: whole layers (full) or the attention core (selective).",
        choices=(None, "full", "selective"))
    recompute_method: Optional[str] = setting(
        None, "--recompute-method", "With full recomputation: uniform recomputes every chunk of "
        "--recompute-num-layers layers as one unit; block recomputes only the first "
        "--recompute-num-layers layers of each pipeline stage. uniform with 1 layer when not "
        "given.", choices=(None, "uniform", "block"))
    recompute_num_layers: Optional[int] = setting(
        None, "--recompute-num-layers", "Layers per recomputed chunk (uniform) or recomputed "
        "layers per stage (block); 1 when not given.")
    # Vision models (Swin-MoE); the language models ignore these.
    img_size: int = setting(224, "--img-size", "Image side in pixels (square images).")
    patch_dim: int = setting(4, "--patch-dim", "Side of the square patches embedded as tokens.")
    num_channels: int = setting(3, "--num-channels", "Colour channels of the input images.")
    num_classes: int = setting(1000, "--num-classes", "Output classes of a classifier.")
    window_size: int = setting(7, "--window-size",
                               "Swin: side of the attention windows, in patches.")
    swin_depths: Any = setting((2, 2, 6, 2), "--swin-depths",
                               "Swin: blocks per stage; their sum is --num-layers.",
                               parse=parse_int_tuple, metavar="D1,D2,...")
    swin_num_heads: Any = setting((3, 6, 12, 24), "--swin-num-heads",
                                  "Swin: attention heads per stage (stage 1 width is "
                                  "--hidden-size, doubled by each patch merging).",
                                  parse=parse_int_tuple, metavar="H1,H2,...")
    label_smoothing: float = setting(0.0, "--label-smoothing",
                                     "Image classification: label smoothing of the "
                                     "cross-entropy.")
    mixup_alpha: float = setting(0.0, "--mixup-alpha",
                                 "Image classification: mixup in training, each micro-batch "
                                 "mixed with a permutation of itself at a Beta(alpha, alpha) "
                                 "weight; 0 turns it off.")

    @property
    def uses_learned_positions(self) -> bool:
        """True when the embedding has a learned position table."""
        return self.position_embedding_type == "learned_absolute"

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (0 without RoPE)."""
        if self.position_embedding_type != "rope":
            return 0
        return int(self.kv_channels * self.rotary_percent)

    def __post_init__(self):
        if self.activation == "swiglu":
            _derive(self, "ffn_hidden_size", max(64, int(4 * self.hidden_size * 2 / 3 / 64) * 64))
        _derive(self, "ffn_hidden_size", 4 * self.hidden_size)
        _derive(self, "max_position_embeddings", self.seq_length)
        _derive(self, "decoder_num_layers", self.num_layers)
        _derive(self, "decoder_seq_length", max(1, self.seq_length // 4))
        check_positive(self, "num_layers", "hidden_size", "ffn_hidden_size",
                       "num_attention_heads", "seq_length", "vocab_size",
                       "make_vocab_size_divisible_by", "max_position_embeddings",
                       "decoder_num_layers", "decoder_seq_length", "layernorm_epsilon",
                       "init_method_std", "rotary_base")
        if self.kv_channels is not None:
            check_positive(self, "kv_channels")
        require(self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
                f"--hidden-size ({self.hidden_size}) is not divisible by --num-attention-heads "
                f"({self.num_attention_heads})")
        _derive(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        check_probability(self, "hidden_dropout", "attention_dropout")
        for name in ("activation", "recompute_granularity", "recompute_method", "normalization",
                     "position_embedding_type"):
            check_choice(self, name)
        require(self.max_position_embeddings >= self.seq_length,
                f"--max-position-embeddings ({self.max_position_embeddings}) is smaller than "
                f"--seq-length ({self.seq_length})")
        if not self.add_position_embedding and self.position_embedding_type == "learned_absolute":
            self.position_embedding_type = "none"
        require(0.0 < self.rotary_percent <= 1.0,
                f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        if self.position_embedding_type == "rope":
            require(self.rotary_dim >= 2 and self.rotary_dim % 2 == 0,
                    f"--rotary-percent {self.rotary_percent} of {self.kv_channels} channels per "
                    f"head rotates {self.rotary_dim}; RoPE needs an even number of at least 2")
        if self.group_query_attention:
            require(self.num_query_groups is not None,
                    "--group-query-attention needs --num-query-groups")
            check_positive(self, "num_query_groups")
            require(self.num_attention_heads % self.num_query_groups == 0,
                    f"--num-attention-heads ({self.num_attention_heads}) is not divisible by "
                    f"--num-query-groups ({self.num_query_groups})")
        else:
            # As in Megatron: without --group-query-attention every head has its own keys.
            self.num_query_groups = self.num_attention_heads
        if self.recompute_method is not None:
            require(self.recompute_granularity == "full",
                    f"--recompute-method {self.recompute_method} needs --recompute-granularity "
                    f"full, got {self.recompute_granularity}")
        if self.recompute_num_layers is not None:
            check_positive(self, "recompute_num_layers")
        for name in ("swin_depths", "swin_num_heads"):
            try:
                setattr(self, name, parse_int_tuple(getattr(self, name)))
            except ValueError as error:
                raise ConfigError(f"--{name.replace('_', '-')}: {error}") from None
        check_positive(self, "img_size", "patch_dim", "num_channels", "num_classes",
                       "window_size")
        check_probability(self, "label_smoothing")
        check_non_negative(self, "mixup_alpha")


@dataclass
class MoEConfig:
    """Mixture-of-Experts layers, router and the all-to-all compressor."""

    num_experts: int = setting(0, "--num-experts", "Experts per MoE layer; 0 is a dense model.")
    moe_layer_freq: Any = setting(
        1, "--moe-layer-freq", "Which layers are MoE, as in Megatron: an int k makes layers "
        "1, 1+k, 1+2k, ... (1-based) MoE; a list expression such as '([0]*1+[1]*1)*12' gives "
        "one 0/1 per layer of the stack.", parse=parse_moe_layer_freq,
        metavar="K|PATTERN")
    router_topk: int = setting(2, "--moe-router-topk", "Experts each token is routed to.")
    moe_ffn_hidden_size: Optional[int] = setting(
        None, "--moe-ffn-hidden-size", "Width of each expert; --ffn-hidden-size when not given.")
    shared_expert_intermediate_size: Optional[int] = setting(
        None, "--moe-shared-expert-intermediate-size",
        "Width of a shared expert that every token passes through next to its routed experts "
        "(computed where the token is, never sent through the all-to-all); none when not given.")
    capacity_factor: Optional[float] = setting(
        None, "--moe-expert-capacity-factor",
        "Expert capacity as a multiple of the even share; dropless when not given.")
    load_balancing_type: str = setting(
        "aux_loss", "--moe-router-load-balancing-type",
        "Load-balancing loss: over the micro-batch's tokens (aux_loss, GShard / Switch), "
        "per sequence and averaged (seq_aux_loss, DeepSeek-V2), or none.",
        choices=("aux_loss", "seq_aux_loss", "none"))
    score_function: str = setting(
        "softmax", "--moe-router-score-function",
        "Router scores: softmax over experts or an independent sigmoid per expert "
        "(DeepSeek-V3); the top-k scores are renormalised to sum to 1 when k > 1.",
        choices=("softmax", "sigmoid"))
    aux_loss_coeff: float = setting(0.0, "--moe-aux-loss-coeff", "Load-balancing loss weight.")
    z_loss_coeff: float = setting(0.0, "--moe-z-loss-coeff", "Router z-loss weight.")
    a2a_compression: str = setting(
        "none", "--moe-a2a-compression",
        "All-to-all compressor (registered in megatron_lsh/moe/compressors): none sends every "
        "row, lsh sends cluster centroids, cast sends low-precision rows.")
    compression_options: Any = None
    """The compressor's own settings (its ``Options`` dataclass); None: its defaults."""
    a2a_compression_skip_layers: Any = setting(
        (), "--moe-a2a-compression-skip-layers",
        "1-based layer positions (counted within each stack, as --moe-layer-freq counts) whose "
        "MoE all-to-all is not compressed by --moe-a2a-compression, e.g. '1' for the first "
        "layer, whose rows are bare token embeddings and lose most under LSH; each must be an "
        "MoE layer. Empty: every MoE layer compresses.", parse=parse_layer_list,
        metavar="N[,N...]")
    a2a_compression_skip_dtype: str = setting(
        "none", "--moe-a2a-compression-skip-dtype",
        "Wire format of the layers --moe-a2a-compression-skip-layers names: none sends their "
        "rows as they are, the others cast them (the cast compressor's --moe-cast-dtype).",
        choices=("none", "bf16", "fp8", "bf16-centered", "fp8-centered"))

    @property
    def enabled(self) -> bool:
        """True when the model has MoE layers."""
        return self.num_experts > 0

    def is_moe_layer(self, position: int, stack_layers: int) -> bool:
        """Is the layer at 1-based ``position`` of a stack of ``stack_layers`` layers MoE?"""
        if not self.enabled:
            return False
        if isinstance(self.moe_layer_freq, int):
            return (position - 1) % self.moe_layer_freq == 0
        require(len(self.moe_layer_freq) == stack_layers,
                f"--moe-layer-freq gives {len(self.moe_layer_freq)} layers, but the stack has "
                f"{stack_layers} (--num-layers / --decoder-num-layers)")
        return bool(self.moe_layer_freq[position - 1])

    def compresses_layer(self, position: int) -> bool:
        """Does the MoE layer at 1-based ``position`` of its stack use --moe-a2a-compression
        (False: one of --moe-a2a-compression-skip-layers, sent per
        --moe-a2a-compression-skip-dtype)?"""
        return position not in self.a2a_compression_skip_layers

    def check_skip_layers(self, stack_sizes) -> None:
        """Every --moe-a2a-compression-skip-layers position is an MoE layer of at least one of
        the stacks (sizes ``stack_sizes``); one sentence naming the position otherwise."""
        for position in self.a2a_compression_skip_layers:
            require(any(position <= size and self.is_moe_layer(position, size)
                        for size in stack_sizes),
                    f"--moe-a2a-compression-skip-layers names layer {position}, which is not an "
                    f"MoE layer (--moe-layer-freq {self.moe_layer_freq!r}, stack sizes "
                    f"{list(stack_sizes)})")

    def __post_init__(self):
        check_non_negative(self, "num_experts", "aux_loss_coeff", "z_loss_coeff")
        check_positive(self, "router_topk")
        if isinstance(self.moe_layer_freq, str):
            self.moe_layer_freq = parse_moe_layer_freq(self.moe_layer_freq)
        if isinstance(self.moe_layer_freq, (list, tuple)):
            self.moe_layer_freq = list(self.moe_layer_freq)
            require(self.moe_layer_freq and all(v in (0, 1) for v in self.moe_layer_freq),
                    f"--moe-layer-freq as a list must hold only 0 and 1, got "
                    f"{self.moe_layer_freq}")
        else:
            require(isinstance(self.moe_layer_freq, int) and self.moe_layer_freq > 0,
                    f"--moe-layer-freq must be a positive int or a 0/1 list, got "
                    f"{self.moe_layer_freq!r}")
        for name in ("moe_ffn_hidden_size", "shared_expert_intermediate_size"):
            if getattr(self, name) is not None:
                check_positive(self, name)
        check_choice(self, "load_balancing_type")
        check_choice(self, "score_function")
        if self.num_experts > 0:
            require(self.router_topk <= self.num_experts,
                    f"--moe-router-topk ({self.router_topk}) exceeds --num-experts "
                    f"({self.num_experts})")
        if self.capacity_factor is not None:
            check_positive(self, "capacity_factor")
        require(isinstance(self.a2a_compression, str) and self.a2a_compression != "",
                f"--moe-a2a-compression must name a compressor, got {self.a2a_compression!r}")
        try:
            self.a2a_compression_skip_layers = parse_layer_list(self.a2a_compression_skip_layers)
        except ValueError as error:
            raise ConfigError(f"--moe-a2a-compression-skip-layers: {error}") from None
        check_choice(self, "a2a_compression_skip_dtype")
