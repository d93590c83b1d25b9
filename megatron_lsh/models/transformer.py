"""Transformer building blocks: attention, MLP, a layer whose FFN is dense or MoE, a block.

Tensors are sequence-first, as in Megatron: ``[s, b, h]`` (with sequence parallelism each TP
rank holds ``[s/tp, b, h]`` between the parallel regions). Legend: s sequence, b batch,
h hidden, n heads on this TP rank, d head width.

The model code reads like single-device code: tensor parallelism lives entirely inside
:mod:`megatron_lsh.parallel.layers` (column/row-parallel linears, which are plain linears when
tp = 1) and expert parallelism inside :class:`megatron_lsh.moe.MoELayer`.

Initialisation does not depend on the layout: every layer seeds the global generator from
``(seed, layer_number)`` before building its parameters, and the parallel layers draw the
full (master) weight and keep their shard. So a TP/PP/EP model starts equal to the
single-process one. The seed scheme (:func:`~megatron_lsh.parallel.random.layer_seed`,
:class:`~megatron_lsh.parallel.random.SeedPart`) lives in :mod:`megatron_lsh.parallel.random`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lsh.config import ConfigError, ModelConfig, MoEConfig, replace_config
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                          build_layernorm, init_method_normal,
                                          scaled_init_method_normal)
from megatron_lsh.models.rotary import RotaryEmbedding
from megatron_lsh.parallel.random import (SeedPart, checkpoint, get_rng_tracker, layer_seed,
                                          seeded)

__all__ = ["InferenceCache", "ParallelAttention", "ParallelMLP", "TransformerBlock",
           "TransformerLayer", "activation_fn", "build_norm", "is_moe_layer", "layer_seed",
           "seeded"]


class InferenceCache:
    """Keys and values of every self-attention layer for the tokens seen so far, for
    incremental decoding: each forward with a cache attends to the cached tokens plus its
    own, appends its keys and values, and (by the model) advances ``offset``, the position of
    its first token."""

    def __init__(self):
        self.offset = 0
        self.kv: dict = {}

    def append(self, layer: int, k_bnsd: torch.Tensor, v_bnsd: torch.Tensor):
        """Keys and values of layer ``layer`` so far, the new ones ``[b, n, s, d]`` added."""
        past = self.kv.get(layer)
        if past is not None:
            k_bnsd = torch.cat([past[0], k_bnsd], dim=2)
            v_bnsd = torch.cat([past[1], v_bnsd], dim=2)
        self.kv[layer] = (k_bnsd, v_bnsd)
        return k_bnsd, v_bnsd


def is_moe_layer(position: int, moe: MoEConfig, stack_layers: int) -> bool:
    """Is the layer at 1-based ``position`` of a stack of ``stack_layers`` layers MoE?
    (``--moe-layer-freq`` as Megatron reads it: :meth:`MoEConfig.is_moe_layer`)."""
    return moe.is_moe_layer(position, stack_layers)


def activation_fn(name: str):
    """The MLP non-linearity by name (swiglu is handled by the MLP itself)."""
    return {"gelu": F.gelu, "relu": F.relu}[name]


class ParallelMLP(nn.Module):
    """h -> ffn -> h with a column-parallel first and a row-parallel second linear."""

    def __init__(self, config: ModelConfig, groups: ProcessGroups, sequence_parallel: bool,
                 device=None):
        super().__init__()
        common = dict(tp_group=groups.tp, bias=config.add_bias_linear,
                      sequence_parallel=sequence_parallel, device=device)
        init = init_method_normal(config.init_method_std)
        out_init = scaled_init_method_normal(config.init_method_std, config.num_layers)
        self.swiglu = config.activation == "swiglu"
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.ffn_hidden_size,
                                        init_method=init, **common)
        if self.swiglu:
            self.fc1_gate = ColumnParallelLinear(config.hidden_size, config.ffn_hidden_size,
                                                 init_method=init, **common)
        else:
            self.act = activation_fn(config.activation)
        self.fc2 = RowParallelLinear(config.ffn_hidden_size, config.hidden_size,
                                     input_is_parallel=True, init_method=out_init, **common)

    def forward(self, x_sbh: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(x_sbh)
        h = F.silu(self.fc1_gate(x_sbh)[0]) * h if self.swiglu else self.act(h)
        return self.fc2(h)[0]


class ParallelAttention(nn.Module):
    """Multi-head (or grouped-query) attention with heads split over TP ranks.

    ``attention_type``: 'self' (q, k, v from the same input) or 'cross' (q from the decoder,
    k and v from the encoder output). ``causal`` adds the lower-triangular mask; a padding
    mask ``[b, s_k]`` (True = attend) may be passed to forward.

    Grouped-query attention (``num_query_groups`` < heads): each of the ``g`` key / value heads
    serves ``heads / g`` consecutive query heads. The fused projection's output features are
    laid out ``(group, [its query heads, key, value], d)``, so a contiguous TP shard holds
    whole groups (g must be divisible by tp); with one group per head this is the plain
    ``(head, {q, k, v}, d)`` layout. RoPE, when configured, rotates q and k of self-attention.
    """

    def __init__(self, config: ModelConfig, groups: ProcessGroups, *, attention_type: str,
                 causal: bool, sequence_parallel: bool, selective_recompute: bool,
                 device=None):
        super().__init__()
        self.tp = groups.tp_size
        query_groups = config.num_query_groups
        if query_groups % self.tp != 0:
            raise ConfigError(f"--num-query-groups ({query_groups}) is not divisible by "
                              f"--tensor-model-parallel-size ({self.tp})")
        self.heads = config.num_attention_heads // self.tp
        self.query_groups = query_groups // self.tp
        self.heads_per_group = config.num_attention_heads // query_groups
        self.head_dim = d = config.kv_channels
        self.causal = causal
        self.attention_type = attention_type
        self.dropout = config.attention_dropout
        self.selective_recompute = selective_recompute
        self.rotary = None
        if attention_type == "self" and config.position_embedding_type == "rope":
            self.rotary = RotaryEmbedding(config.rotary_dim, config.rotary_base)
        proj = config.num_attention_heads * d
        kv_proj = query_groups * d
        common = dict(tp_group=groups.tp, bias=config.add_bias_linear,
                      sequence_parallel=sequence_parallel, device=device)
        init = init_method_normal(config.init_method_std)
        if attention_type == "self":
            self.qkv = ColumnParallelLinear(config.hidden_size, proj + 2 * kv_proj,
                                            init_method=init, **common)
        else:
            self.q = ColumnParallelLinear(config.hidden_size, proj, init_method=init, **common)
            self.kv = ColumnParallelLinear(config.hidden_size, 2 * kv_proj, init_method=init,
                                           **common)
        self.out = RowParallelLinear(proj, config.hidden_size, input_is_parallel=True,
                                     init_method=scaled_init_method_normal(
                                         config.init_method_std, config.num_layers), **common)

    def _core(self, q_bnsd, k_bgsd, v_bgsd, mask):
        if self.heads_per_group > 1:  # each key / value head serves its group's query heads
            k_bgsd = k_bgsd.repeat_interleave(self.heads_per_group, dim=1)
            v_bgsd = v_bgsd.repeat_interleave(self.heads_per_group, dim=1)
        if not self.training or self.dropout == 0.0:
            return F.scaled_dot_product_attention(q_bnsd, k_bgsd, v_bgsd, attn_mask=mask)
        # Heads are split over TP ranks, so attention dropout draws from the per-rank stream.
        with get_rng_tracker().fork():
            return F.scaled_dot_product_attention(q_bnsd, k_bgsd, v_bgsd, attn_mask=mask,
                                                  dropout_p=self.dropout)

    def forward(self, x_sbh: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                context_sbh: Optional[torch.Tensor] = None,
                cache: Optional[InferenceCache] = None, layer: int = 0) -> torch.Tensor:
        """``cache`` (self-attention, inference): attend to the cached tokens too; ``layer``
        names this attention's entry in it."""
        g, per, d = self.query_groups, self.heads_per_group, self.head_dim
        if self.attention_type == "self":
            qkv, _ = self.qkv(x_sbh)
            s, b = qkv.shape[:2]
            q, k, v = qkv.view(s, b, g, per + 2, d).split([per, 1, 1], dim=3)
            q = q.reshape(s, b, g * per, d)
            k, v = k.squeeze(3), v.squeeze(3)
        else:
            q, _ = self.q(x_sbh)
            s, b = q.shape[:2]
            q = q.view(s, b, self.heads, d)
            kv, _ = self.kv(context_sbh)
            k, v = kv.view(kv.shape[0], b, g, 2, d).unbind(3)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads or groups, s, d]
        offset = cache.offset if cache is not None else 0
        if self.rotary is not None:
            q, k = self.rotary(q, k, offset)
        if cache is not None and self.attention_type == "self":
            k, v = cache.append(layer, k, v)
        mask = None
        if self.causal:
            sq, sk = q.shape[2], k.shape[2]   # the sq new tokens are the last of the sk
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        if padding_mask is not None:
            pad = padding_mask[:, None, None, :].to(torch.bool)
            mask = pad if mask is None else (mask & pad)
        if self.selective_recompute and self.training:
            ctx = checkpoint(self._core, q, k, v, mask)
        else:
            ctx = self._core(q, k, v, mask)
        ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, self.heads * d)
        return self.out(ctx)[0]


def build_norm(config: ModelConfig, sequence_parallel: bool, device=None) -> nn.Module:
    """The configured normalisation (``--normalization``, ``--norm-epsilon``) of width h."""
    return build_layernorm(config.hidden_size, config.layernorm_epsilon, sequence_parallel,
                           normalization=config.normalization, device=device)


class TransformerLayer(nn.Module):
    """Pre-norm layer: self-attention, optional cross-attention, then a dense or MoE FFN.

    ``layer_number`` is global (it names the layer and seeds its weights); ``stack_position``
    (1-based, within its encoder or decoder stack of ``stack_layers``) decides whether the FFN
    is MoE. A MoE FFN may have a shared expert (``--moe-shared-expert-intermediate-size``):
    a dense, TP-split MLP every token passes through where it is, added to the routed experts'
    output; it never crosses the all-to-all.

    ``forward`` returns ``(hidden, aux_loss)`` where ``aux_loss`` is the MoE router loss of
    this layer (0 for dense layers), already multiplied by its coefficients.
    """

    def __init__(self, config: ModelConfig, moe: MoEConfig, groups: ProcessGroups,
                 layer_number: int, *, seed: int, causal: bool, cross_attention: bool,
                 sequence_parallel: bool = False, stack_position: Optional[int] = None,
                 stack_layers: Optional[int] = None, device=None):
        super().__init__()
        self.layer_number = layer_number
        self.sequence_parallel = sequence_parallel
        self.hidden_dropout = config.hidden_dropout
        selective = config.recompute_granularity == "selective"
        attention = dict(sequence_parallel=sequence_parallel, selective_recompute=selective,
                         device=device)
        with seeded(layer_seed(seed, layer_number, SeedPart.LAYER)):
            self.ln_attn = build_norm(config, sequence_parallel, device)
            self.attention = ParallelAttention(config, groups, attention_type="self",
                                               causal=causal, **attention)
            self.cross = None
            if cross_attention:
                self.ln_cross = build_norm(config, sequence_parallel, device)
                self.cross = ParallelAttention(config, groups, attention_type="cross",
                                               causal=False, **attention)
            self.ln_mlp = build_norm(config, sequence_parallel, device)
            self.is_moe = is_moe_layer(stack_position or layer_number, moe,
                                       stack_layers or config.num_layers)
            self.shared_expert = None
            if self.is_moe:
                from megatron_lsh.moe import MoELayer  # the dense model needs no MoE code
                self.mlp = MoELayer(moe, config.hidden_size,
                                    moe.moe_ffn_hidden_size or config.ffn_hidden_size, groups,
                                    activation=config.activation,
                                    add_bias=config.add_bias_linear,
                                    init_method_std=config.init_method_std,
                                    output_layer_init_std=config.init_method_std
                                    / math.sqrt(2.0 * config.num_layers),
                                    seed=layer_seed(seed, layer_number, SeedPart.MOE),
                                    sequence_parallel=sequence_parallel,
                                    compress=moe.compresses_layer(stack_position
                                                                  or layer_number),
                                    device=device)
            else:
                self.mlp = ParallelMLP(config, groups, sequence_parallel, device=device)
        if self.is_moe and moe.shared_expert_intermediate_size:
            shared = replace_config(config, ffn_hidden_size=moe.shared_expert_intermediate_size)
            with seeded(layer_seed(seed, layer_number, SeedPart.SHARED_EXPERT)):
                self.shared_expert = ParallelMLP(shared, groups, sequence_parallel, device=device)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.hidden_dropout == 0.0:
            return x
        if self.sequence_parallel:  # each TP rank holds different tokens
            with get_rng_tracker().fork():
                return F.dropout(x, self.hidden_dropout, True)
        return F.dropout(x, self.hidden_dropout, True)

    def forward(self, x_sbh: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                context_sbh: Optional[torch.Tensor] = None,
                context_padding_mask: Optional[torch.Tensor] = None,
                cache: Optional[InferenceCache] = None):
        x = x_sbh + self._dropout(self.attention(self.ln_attn(x_sbh), padding_mask,
                                                 cache=cache, layer=self.layer_number))
        if self.cross is not None:
            x = x + self._dropout(self.cross(self.ln_cross(x), context_padding_mask, context_sbh))
        h = self.ln_mlp(x)
        if self.is_moe:
            y, losses = self.mlp(h)
            aux = losses["aux_loss"] + losses["z_loss"]
            self.last_aux_loss = losses["aux_loss"].detach()  # the load-balancing part, logged
            if self.shared_expert is not None:
                y = y + self.shared_expert(h)
        else:
            y, aux = self.mlp(h), x.new_zeros(())
        return x + self._dropout(y), aux


class TransformerBlock(nn.Module):
    """The layers ``layer_numbers`` (1-based, global) of one stage, plus the final norm.

    ``final_layernorm``: True on the stage that ends this stack (the last pipeline stage for
    GPT/RoBERTa; for T5 the stage that ends the encoder or decoder). ``stack_start``: the
    global number of the stack's first layer (T5's decoder starts after the encoder), so MoE
    placement counts within the stack.

    Activation checkpointing: 'full' recomputes layers in backward (MoE layers included):
    with ``--recompute-method uniform`` every chunk of ``--recompute-num-layers`` consecutive
    layers of the stage as one unit, with ``block`` each of the stage's first
    ``--recompute-num-layers`` layers and none after. 'selective' recomputes only the
    attention core. Both restore the RNG, so dropout repeats exactly.
    """

    def __init__(self, config: ModelConfig, moe: MoEConfig, groups: ProcessGroups,
                 layer_numbers, *, seed: int, causal: bool, cross_attention: bool = False,
                 final_layernorm: bool = True, sequence_parallel: bool = False,
                 stack_start: int = 1, stack_layers: Optional[int] = None, device=None):
        super().__init__()
        self.recompute_full = config.recompute_granularity == "full"
        self.recompute_method = config.recompute_method or "uniform"
        self.recompute_num_layers = config.recompute_num_layers or 1
        stack_layers = stack_layers or config.num_layers
        # Keyed by the global layer number, so parameter names do not depend on the pipeline
        # split (a checkpoint or a gradient can be matched across layouts by name).
        self.layers = nn.ModuleDict({
            str(n): TransformerLayer(config, moe, groups, n, seed=seed, causal=causal,
                                     cross_attention=cross_attention,
                                     sequence_parallel=sequence_parallel,
                                     stack_position=n - stack_start + 1,
                                     stack_layers=stack_layers, device=device)
            for n in layer_numbers})
        self.final_layernorm = None
        if final_layernorm:
            with seeded(layer_seed(seed, 0, SeedPart.FINAL_LAYERNORM)):
                self.final_layernorm = build_norm(config, sequence_parallel, device)

    def _chunks(self) -> list:
        """``(layers, recompute)`` runs of this stage's layers, in order."""
        layers = list(self.layers.values())
        if not (self.recompute_full and self.training):
            return [(layers, False)]
        n = self.recompute_num_layers
        if self.recompute_method == "block":
            return [([layer], True) for layer in layers[:n]] + [(layers[n:], False)]
        return [(layers[i:i + n], True) for i in range(0, len(layers), n)]

    @staticmethod
    def _run(layers, x_sbh, padding_mask, context_sbh, context_padding_mask, cache=None):
        aux_total = x_sbh.new_zeros(())
        for layer in layers:
            x_sbh, aux = layer(x_sbh, padding_mask, context_sbh, context_padding_mask, cache)
            aux_total = aux_total + aux
        return x_sbh, aux_total

    def forward(self, x_sbh: torch.Tensor, padding_mask=None, context_sbh=None,
                context_padding_mask=None, cache: Optional[InferenceCache] = None):
        if cache is not None:   # inference: no recomputation
            x_sbh, aux = self._run(list(self.layers.values()), x_sbh, padding_mask,
                                   context_sbh, context_padding_mask, cache)
            if self.final_layernorm is not None:
                x_sbh = self.final_layernorm(x_sbh)
            return x_sbh, aux
        aux_total = x_sbh.new_zeros(())
        for layers, recompute in self._chunks():
            if not layers:
                continue
            if recompute:
                x_sbh, aux = checkpoint(self._run, layers, x_sbh, padding_mask, context_sbh,
                                        context_padding_mask)
            else:
                x_sbh, aux = self._run(layers, x_sbh, padding_mask, context_sbh,
                                       context_padding_mask)
            aux_total = aux_total + aux
        if self.final_layernorm is not None:
            x_sbh = self.final_layernorm(x_sbh)
        return x_sbh, aux_total
