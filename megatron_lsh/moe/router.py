"""Top-k router: scores over experts, top-k choice, capacity, load-balancing losses.

The router is a replicated (dense) linear ``[E, H]``. Its math runs in fp32 (or the input's
precision if that is higher, so float64 gradient checks work): small differences in the
logits would otherwise flip expert choices between otherwise identical runs.

Scores: a softmax over the experts (``score_function='softmax'``) or an independent sigmoid
per expert (``'sigmoid'``, DeepSeek-V3). Gate weights: for top-1 the gate is the chosen
expert's score (Switch), so the router learns from the task loss; for top-k > 1 the k scores
are renormalised to sum to 1 (GShard).

Capacity (``capacity_factor`` not None): each expert keeps at most
``ceil(T * k / E * capacity_factor)`` of this rank's rows, those with the highest gate weight
(Megatron's "probs" drop policy); dropped rows contribute nothing to their token's output.
``capacity_factor=None`` is dropless.

Losses are returned, already multiplied by their coefficients (never collected in globals):

* aux (Switch / GShard load balancing, ``load_balancing_type='aux_loss'``):
  ``coeff * E * sum_e f_e * P_e`` with ``f_e`` the share of the ``T * k`` choices that picked
  expert e (before dropping) and ``P_e`` the mean score of e over the tokens (sigmoid scores
  are first normalised over the experts, as Megatron does);
* per-sequence aux (``'seq_aux_loss'``, DeepSeek-V2): the same quantity computed over each
  sequence's tokens alone and averaged over the sequences (the tokens must be ``[s, b]``
  ordered, as the transformer's are: pass ``num_sequences = b``);
* ``'none'``: no load-balancing loss, whatever the coefficient;
* z-loss (ST-MoE): ``coeff * mean_t logsumexp(logits_t) ** 2``.

The router can also multiply the tokens by extra columns in the same matmul (one read of the
tokens serves two consumers): the compressor's ``router_columns()``, e.g. the LSH rotations.
The product comes back as ``Routing.columns_TQ`` and is not differentiable.

Legend: T tokens, H hidden, E experts, K top-k, Q extra columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from megatron_lsh.config import ConfigError


@dataclass
class Routing:
    """What the router decided for each token (all tensors on the input's device)."""

    gates_TK: torch.Tensor
    """Gate weight of each chosen expert (fp32 or higher, differentiable)."""
    experts_TK: torch.Tensor
    """Chosen expert indices (int64)."""
    kept_TK: Optional[torch.Tensor]
    """False where the capacity dropped the row; None when nothing can be dropped."""
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    columns_TQ: Optional[torch.Tensor] = None
    """``x @ extra_HQ`` when the router was given extra columns, else None."""

    def token_slice(self, own: slice, gates_TK: torch.Tensor) -> "Routing":
        """The decisions for tokens ``own`` (gates passed in: their slicing is autograd's)."""
        def cut(t):
            return None if t is None else t[own]
        return Routing(gates_TK, self.experts_TK[own], cut(self.kept_TK), self.aux_loss,
                       self.z_loss, cut(self.columns_TQ))


class _LogitsAndColumns(torch.autograd.Function):
    """``x @ [W^T | extra]`` in one matmul: one read of the tokens serves the router and the
    compressor. Gradients flow to ``x`` and ``W`` only (the extra products are not
    differentiable)."""

    @staticmethod
    def forward(ctx, x_TH, weight_EH, extra_HQ):
        ctx.save_for_backward(x_TH, weight_EH)
        out = x_TH @ torch.cat([weight_EH.t(), extra_HQ], dim=1)
        num_experts = weight_EH.shape[0]
        columns_TQ = out[:, num_experts:].contiguous()
        ctx.mark_non_differentiable(columns_TQ)
        return out[:, :num_experts].contiguous(), columns_TQ

    @staticmethod
    def backward(ctx, grad_logits_TE, grad_columns):
        x_TH, weight_EH = ctx.saved_tensors
        grad_x = grad_logits_TE @ weight_EH if ctx.needs_input_grad[0] else None
        grad_w = grad_logits_TE.t() @ x_TH if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


class TopKRouter(nn.Module):
    """Linear scores -> softmax -> top-k experts per token, with capacity and aux losses."""

    def __init__(self, hidden_size: int, num_experts: int, topk: int, *,
                 capacity_factor: Optional[float] = None, aux_loss_coeff: float = 0.0,
                 z_loss_coeff: float = 0.0, init_method_std: float = 0.02, seed: int = 1234,
                 score_function: str = "softmax", load_balancing_type: str = "aux_loss",
                 params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not 1 <= topk <= num_experts:
            raise ConfigError(f"--moe-router-topk ({topk}) must be between 1 and --num-experts "
                              f"({num_experts})")
        if score_function not in ("softmax", "sigmoid"):
            raise ConfigError(f"--moe-router-score-function must be softmax or sigmoid, got "
                              f"{score_function!r}")
        if load_balancing_type not in ("aux_loss", "seq_aux_loss", "none"):
            raise ConfigError(f"--moe-router-load-balancing-type must be aux_loss, "
                              f"seq_aux_loss or none, got {load_balancing_type!r}")
        self.score_function, self.load_balancing_type = score_function, load_balancing_type
        self.num_experts, self.topk = num_experts, topk
        self.capacity_factor = capacity_factor
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff
        self.init_method_std, self.seed = init_method_std, seed
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=params_dtype,
                                               device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, init_std) from the layer's seed: identical on every rank."""
        if self.weight.is_meta:
            return
        gen = torch.Generator().manual_seed(self.seed)
        full = torch.empty(self.weight.shape, dtype=torch.float32)
        full.normal_(0.0, self.init_method_std, generator=gen)
        with torch.no_grad():
            self.weight.copy_(full)

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Rows each expert may keep from ``num_tokens`` local tokens (None: dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(num_tokens * self.topk / self.num_experts * self.capacity_factor)

    def forward(self, x_TH: torch.Tensor, extra_HQ: Optional[torch.Tensor] = None,
                num_sequences: int = 1) -> Routing:
        """Route ``x_TH``; see the module docstring for gates, capacity and losses.

        ``extra_HQ``: more columns to multiply the tokens by in the same matmul; the result
        comes back as ``Routing.columns_TQ``. ``num_sequences``: b of the ``[s, b]`` token
        order (only the per-sequence load-balancing loss uses it).
        """
        compute_dtype = torch.promote_types(x_TH.dtype, torch.float32)
        columns_TQ = None
        if extra_HQ is None:
            logits_TE = x_TH.to(compute_dtype) @ self.weight.to(compute_dtype).t()
        else:
            logits_TE, columns_TQ = _LogitsAndColumns.apply(
                x_TH.to(compute_dtype), self.weight.to(compute_dtype), extra_HQ.to(compute_dtype))
        num_tokens = logits_TE.shape[0]
        if self.score_function == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
            balance_TE = scores_TE
        else:
            scores_TE = torch.sigmoid(logits_TE)
            balance_TE = scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)
        top_p_TK, experts_TK = torch.topk(scores_TE, self.topk, dim=-1)
        gates_TK = top_p_TK / top_p_TK.sum(-1, keepdim=True) if self.topk > 1 else top_p_TK

        with torch.no_grad():
            chosen_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
            chosen_TE.scatter_(1, experts_TK, True)
        aux_loss, z_loss = self._losses(logits_TE, balance_TE, chosen_TE, num_tokens,
                                        num_sequences)

        kept_TK = None
        cap = self.capacity(num_tokens)
        if cap is not None and cap < num_tokens:
            with torch.no_grad():
                # Per expert, keep the `cap` chosen rows with the highest gate weight.
                gate_TE = torch.full_like(scores_TE, -1.0)
                gate_TE.scatter_(1, experts_TK, gates_TK.detach())
                best = torch.topk(gate_TE, cap, dim=0).indices
                keep_TE = torch.zeros_like(chosen_TE).scatter_(0, best, True) & chosen_TE
                kept_TK = keep_TE.gather(1, experts_TK)
        return Routing(gates_TK, experts_TK, kept_TK, aux_loss, z_loss, columns_TQ)

    def _losses(self, logits_TE, scores_TE, chosen_TE, num_tokens, num_sequences=1):
        # Connected to the graph even when zero, so every rank's backward looks the same.
        zero = logits_TE.sum() * 0.0
        if num_tokens == 0:
            return zero, zero
        aux_loss = zero
        if self.aux_loss_coeff > 0 and self.load_balancing_type != "none":
            # [s, b, E] token order: per-sequence statistics are means over dim 0.
            b = num_sequences if self.load_balancing_type == "seq_aux_loss" else 1
            if num_tokens % b:
                raise ConfigError(f"seq_aux_loss needs [s, b] ordered tokens: {num_tokens} "
                                  f"tokens are not a multiple of {b} sequences")
            chosen_SBE = chosen_TE.view(num_tokens // b, b, -1).to(scores_TE.dtype)
            choice_share_BE = chosen_SBE.mean(0) / self.topk
            mean_prob_BE = scores_TE.view(num_tokens // b, b, -1).mean(0)
            aux_loss = (self.aux_loss_coeff * self.num_experts
                        * (choice_share_BE * mean_prob_BE).sum(-1).mean())
        z_loss = zero
        if self.z_loss_coeff > 0:
            z_loss = self.z_loss_coeff * torch.logsumexp(logits_TE, dim=-1).square().mean()
        return aux_loss, z_loss
