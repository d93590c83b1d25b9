"""MoELayer: router -> (TP split) -> dispatcher with its compressor -> experts -> (TP gather).

The layer reads like a single-device FFN: ``forward(hidden_states) -> (output, losses)``.
Parallelism comes from the :class:`ProcessGroups` it is given:

* EP: the experts are split over ``groups.ep``; the dispatcher's all-to-all moves rows there.
* TP without sequence parallelism: the tokens are identical on the ranks of ``groups.tp``.
  The router runs on all of them (same decision everywhere), then each TP rank dispatches
  only its share of the tokens and the outputs are all-gathered, so no token crosses the
  network twice. Both steps are autograd-correct (split: backward all-gathers; gather:
  backward keeps the own share), so every TP rank ends with the TP=1 gradients.
  A compressor that is ``tp_shared`` (LSH) instead compresses all the replicated tokens,
  identically on every TP rank, and the dispatcher splits the *payload* (every expert's
  centroids) among the TP ranks and all-gathers the returned outputs: the clusters are those
  of TP=1 (same rate, same result), at the price of every TP rank doing the clustering.
* TP with sequence parallelism: each TP rank already holds different tokens; nothing is split
  or gathered. The router weight is then marked ``sequence_parallel = True`` (its gradient
  must be all-reduced over TP) and the losses are divided by the TP size, so that the summed
  gradient is that of the mean of the per-shard losses.

Per iteration the trainer calls ``set_iteration(it)`` (passed on to the compressor), and may read
``layer.last_stats`` (a :class:`MoEStats`) after the forward; backward stage times are added
to the same object during the backward when ``layer.timing`` is on.

Legend: T tokens, H hidden.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron_lsh.config import ConfigError, MoEConfig
from megatron_lsh.moe.compressors import build_compressor
from megatron_lsh.moe.dispatcher import AllToAllDispatcher
from megatron_lsh.moe.experts import GroupedExperts
from megatron_lsh.moe.router import Routing, TopKRouter
from megatron_lsh.moe.stats import MoEStats, StageTimer
from megatron_lsh.parallel.all_to_all import gather_from_tp, split_to_tp, tp_share_sizes
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.random import mix_seed


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN with expert parallelism and a compressible all-to-all."""

    def __init__(self, moe_config: MoEConfig, hidden_size: int, ffn_hidden_size: int,
                 groups: ProcessGroups, *, activation: str = "gelu", add_bias: bool = True,
                 init_method_std: float = 0.02, output_layer_init_std: Optional[float] = None,
                 seed: int = 1234, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, compress: bool = True, device=None,
                 timing: bool = False):
        super().__init__()
        if moe_config.num_experts < 1:
            raise ConfigError(f"--num-experts must be positive for a MoE layer, got "
                              f"{moe_config.num_experts}")
        if moe_config.num_experts % groups.ep_size != 0:
            raise ConfigError(f"--num-experts ({moe_config.num_experts}) is not divisible by "
                              f"--expert-model-parallel-size ({groups.ep_size})")
        self.config, self.groups = moe_config, groups
        self.hidden_size = hidden_size
        self.sequence_parallel = sequence_parallel and groups.tp_size > 1
        self.timing = timing
        self.router = TopKRouter(hidden_size, moe_config.num_experts, moe_config.router_topk,
                                 capacity_factor=moe_config.capacity_factor,
                                 aux_loss_coeff=moe_config.aux_loss_coeff,
                                 z_loss_coeff=moe_config.z_loss_coeff,
                                 score_function=moe_config.score_function,
                                 load_balancing_type=moe_config.load_balancing_type,
                                 init_method_std=init_method_std, seed=mix_seed(seed, 1),
                                 params_dtype=params_dtype, device=device)
        for param in self.router.parameters():
            param.sequence_parallel = self.sequence_parallel
        self.experts = GroupedExperts(moe_config.num_experts, hidden_size, ffn_hidden_size,
                                      ep_rank=groups.ep_rank, ep_size=groups.ep_size,
                                      activation=activation, add_bias=add_bias,
                                      init_method_std=init_method_std,
                                      output_layer_init_std=output_layer_init_std,
                                      seed=mix_seed(seed, 2), params_dtype=params_dtype,
                                      device=device)
        self.compressor = build_compressor(moe_config, hidden_size, seed=seed, device=device,
                                           same_node_E=self._same_node_experts(),
                                           compress=compress)
        self.dispatcher = AllToAllDispatcher(moe_config.num_experts, groups.ep, self.compressor)
        self.last_stats: Optional[MoEStats] = None

    def _same_node_experts(self) -> Optional[torch.Tensor]:
        """Bool per expert: does its owner run on this rank's node (None: unknown)."""
        ranks = self.groups.ep_ranks
        if ranks is None:
            return None
        local = self.config.num_experts // self.groups.ep_size
        return torch.tensor([self.groups.same_node(ranks[e // local])
                             for e in range(self.config.num_experts)])

    def reset_parameters(self) -> None:
        """(Re)initialise router, experts and compressor state (after ``to_empty`` from meta)."""
        self.router.reset_parameters()
        self.experts.reset_parameters()
        self.compressor.reset_parameters()

    def set_iteration(self, iteration: int) -> None:
        """Tell the compressor the training iteration (e.g. a scheduled redraw)."""
        self.compressor.set_iteration(iteration)

    def _tp_share(self, x_TH: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, Routing]:
        """This TP rank's share of replicated tokens and of their routing decisions."""
        group = self.groups.tp
        sizes = tp_share_sizes(x_TH.shape[0], self.groups.tp_size)
        start = sum(sizes[: self.groups.tp_rank])
        own = slice(start, start + sizes[self.groups.tp_rank])
        return split_to_tp(x_TH, group), routing.token_slice(
            own, split_to_tp(routing.gates_TK, group))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``[s, b, h]`` or ``[tokens, h]`` -> (same shape, {'aux_loss', 'z_loss'} scalars).

        The losses are already multiplied by their coefficients.
        """
        shape = hidden_states.shape
        x_TH = hidden_states.reshape(-1, self.hidden_size)
        num_tokens = x_TH.shape[0]
        # The router's matmul also yields the columns the compressor asked for, if any.
        timer = StageTimer(self.timing, x_TH.device)
        route_start = timer.now() if self.timing else None
        sequences = shape[1] if len(shape) == 3 else 1   # [s, b, h]: tokens are s-major
        routing = self.router(x_TH, self.compressor.router_columns(), num_sequences=sequences)
        route_end = timer.now() if self.timing else None
        replicated = self.groups.tp_size > 1 and not self.sequence_parallel
        shared = replicated and self.compressor.tp_shared
        split_tokens = replicated and not shared
        if split_tokens:
            x_TH, routing = self._tp_share(x_TH, routing)
        out_TH, stats = self.dispatcher(x_TH, routing, self.experts, timer,
                                        tp_group=self.groups.tp if shared else None)
        if self.timing:
            timer.charge(stats, "route", route_start, route_end)
            if routing.columns_TQ is not None:
                extra = routing.columns_TQ.shape[1]
                timer.charge(stats, "project", route_start, route_end,
                             extra / (extra + self.config.num_experts))
        if split_tokens:
            out_TH = gather_from_tp(out_TH, num_tokens, self.groups.tp)
        self.last_stats = stats
        aux_loss, z_loss = routing.aux_loss, routing.z_loss
        if self.sequence_parallel:
            aux_loss, z_loss = aux_loss / self.groups.tp_size, z_loss / self.groups.tp_size
        return out_TH.reshape(shape), {"aux_loss": aux_loss, "z_loss": z_loss}
