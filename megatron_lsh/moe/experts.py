"""The experts this rank holds, computed as one grouped MLP (a loop over experts, not tokens).

Weights are stacked per local expert: ``fc1_weight [E_local, H, F1]`` (F1 = 2F for swiglu,
whose first half is the gate), ``fc2_weight [E_local, F, H]``, optional biases. Every
parameter is marked ``param.is_expert = True``: the data-parallel code reduces those over the
expert-data-parallel group instead of DP, and the grad norm sums them over EP.

Initialisation does not depend on the EP layout: expert ``e`` (global index) draws its weights
from its own generator seeded from ``(seed, e)``, so an EP=4 layer holds exactly the slices of
the single-process layer. Per-expert generators give the same guarantee as drawing the full
``[E, ...]`` tensor and slicing, without materialising all experts on every rank (512 experts of
1024 x 4096 would be 8 GB per weight). On the meta device nothing is initialised.

Megatron's init: fc1 ~ normal(0, init_std), fc2 ~ normal(0, output_layer_init_std)
(the caller passes the depth-scaled std), biases zero.

Legend: R rows, H hidden, F ffn hidden, E experts.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lsh.config import ConfigError
from megatron_lsh.parallel.random import mix_seed

ACTIVATIONS = ("gelu", "relu", "swiglu")


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """gelu / relu, or swiglu = silu(first half) * second half (Megatron's layout)."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    gate, up = torch.chunk(h, 2, dim=-1)
    return F.silu(gate) * up


class GroupedExperts(nn.Module):
    """The ``num_experts / ep_size`` experts of EP rank ``ep_rank``, as stacked weights."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, *,
                 ep_rank: int = 0, ep_size: int = 1, activation: str = "gelu",
                 add_bias: bool = True, init_method_std: float = 0.02,
                 output_layer_init_std: Optional[float] = None, seed: int = 1234,
                 params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        if num_experts % ep_size != 0:
            raise ConfigError(f"--num-experts ({num_experts}) is not divisible by "
                              f"--expert-model-parallel-size ({ep_size})")
        self.num_experts, self.ep_rank, self.ep_size = num_experts, ep_rank, ep_size
        self.num_local_experts = num_experts // ep_size
        self.first_expert = ep_rank * self.num_local_experts
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.activation = activation
        self.init_method_std = init_method_std
        self.output_layer_init_std = (init_method_std if output_layer_init_std is None
                                      else output_layer_init_std)
        self.seed = seed
        fc1_out = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        n = self.num_local_experts
        kw = dict(dtype=params_dtype, device=device)
        self.fc1_weight = nn.Parameter(torch.empty(n, hidden_size, fc1_out, **kw))
        self.fc2_weight = nn.Parameter(torch.empty(n, ffn_hidden_size, hidden_size, **kw))
        self.fc1_bias = nn.Parameter(torch.empty(n, fc1_out, **kw)) if add_bias else None
        self.fc2_bias = nn.Parameter(torch.empty(n, hidden_size, **kw)) if add_bias else None
        for param in self.parameters():
            param.is_expert = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every local expert from its own (seed, global expert index) generator."""
        if self.fc1_weight.is_meta:
            return
        with torch.no_grad():
            for local in range(self.num_local_experts):
                gen = torch.Generator().manual_seed(mix_seed(self.seed, self.first_expert + local))
                fc1 = torch.empty(self.fc1_weight.shape[1:]).normal_(
                    0.0, self.init_method_std, generator=gen)
                fc2 = torch.empty(self.fc2_weight.shape[1:]).normal_(
                    0.0, self.output_layer_init_std, generator=gen)
                self.fc1_weight[local].copy_(fc1)
                self.fc2_weight[local].copy_(fc2)
            if self.fc1_bias is not None:
                self.fc1_bias.zero_()
                self.fc2_bias.zero_()

    def forward(self, x_RH: torch.Tensor, rows_per_expert: Sequence[int]) -> torch.Tensor:
        """Rows sorted by local expert (``rows_per_expert[i]`` rows for local expert i) -> outputs.

        Every expert runs, even on zero rows, so all expert parameters always get a gradient
        (zero when unused) and every rank's backward touches the same parameters. The stacked
        weights are unbound once: the backward then stacks the per-expert gradients in one
        write, instead of one full-size zero-filled gradient per expert (what indexing
        ``weight[i]`` per expert would cost).
        """
        chunks = torch.split(x_RH, list(rows_per_expert), dim=0)
        fc1_w, fc2_w = self.fc1_weight.unbind(0), self.fc2_weight.unbind(0)
        fc1_b = self.fc1_bias.unbind(0) if self.fc1_bias is not None else None
        fc2_b = self.fc2_bias.unbind(0) if self.fc2_bias is not None else None
        outs = []
        for i, chunk in enumerate(chunks):
            h = chunk @ fc1_w[i] if fc1_b is None else torch.addmm(fc1_b[i], chunk, fc1_w[i])
            h = activate(h, self.activation)
            outs.append(h @ fc2_w[i] if fc2_b is None else torch.addmm(fc2_b[i], h, fc2_w[i]))
        return torch.cat(outs, dim=0) if outs else x_RH.new_zeros((0, self.hidden_size))
