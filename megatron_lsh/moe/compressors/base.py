"""The compressor protocol: what the dispatcher asks of a plug-in, and nothing more.

The dispatcher (``moe/dispatcher.py``) hands a compressor this rank's rows, sorted by
destination expert (a :class:`Rows`), and gets back a payload to send; after the experts ran
and their outputs came back, the compressor combines them into one output per token. The
dispatcher knows only this protocol (docs/ARCHITECTURE.md, "The token's path"):

* ``compress(rows, timer) -> (payload_PH, payload_per_expert_E, context)``: the rows to send,
  sorted by expert, and how many go to each expert (the split sizes follow from it);
* ``combine(expert_out_PH, context, rows, timer) -> out_TH``: the gate-weighted output of
  every token from the expert outputs of the payload; the default restores nothing (the
  payload were the rows) and sums rows into tokens;
* ``statistics(context) -> {name: value}``: the compressor's own per-forward statistics
  (e.g. how close the rows are to what was sent for them), 0-dim tensors read lazily;
* optional capabilities, declared by overriding: ``router_columns()`` (a matrix ``[H, Q]``
  the router should multiply the tokens by in its own matmul; the product arrives as
  ``rows.router_columns_TQ``), ``codec`` (a wire format for the payload, both directions),
  ``overhead_stages`` (its stage-timer names that count as compression overhead),
  ``tp_shared`` (compress the tokens replicated over TP once, split the payload),
  ``set_iteration(it)`` (called once per training iteration), ``reset_parameters()``.

A compressor's settings are its ``Options`` dataclass (fields declared with
:func:`megatron_lsh.config.setting`, so they become ``--moe-<name>-...`` flags), and its
constructor takes ``(options, *, hidden_size, num_experts, seed, device, same_node_E)``;
``same_node_E`` (bool per expert, or None when unknown) says which destination experts live
on this rank's node, for compressors that treat intra-node traffic differently.

Legend: T tokens, K top-k, R rows, P payload rows, H hidden, E experts, Q router columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn as nn


@dataclass
class NoOptions:
    """Settings of a compressor that has none."""


@dataclass
class Rows:
    """This rank's dispatch rows, sorted by expert, and the tokens they came from.

    The row copies ``rows_RH = x_TH[token_of_row_R]`` are made on first use only: a
    compressor that works from the tokens directly never pays for them.
    """

    x_TH: torch.Tensor
    expert_of_row_R: torch.Tensor
    token_of_row_R: torch.Tensor
    gate_of_row_R: torch.Tensor
    rows_per_expert_E: torch.Tensor
    slot_of_row_R: torch.Tensor
    """Position ``t * topk + j`` of each row in the router's ``[T, topk]`` choice matrix."""
    topk: int
    router_columns_TQ: Optional[torch.Tensor] = None
    """``x_TH @ compressor.router_columns()``, when the compressor asked for it."""
    _rows_RH: Optional[torch.Tensor] = None

    @property
    def rows_RH(self) -> torch.Tensor:
        """The rows (one token copy per (token, expert) pair), gathered on first use."""
        if self._rows_RH is None:
            self._rows_RH = self.x_TH.index_select(0, self.token_of_row_R)
        return self._rows_RH

    def gate_TK(self) -> torch.Tensor:
        """Gate weights as a ``[T, topk]`` matrix (0 where a slot sent no row)."""
        num_tokens = self.x_TH.shape[0]
        return self.gate_of_row_R.new_zeros(num_tokens * self.topk).scatter(
            0, self.slot_of_row_R, self.gate_of_row_R).view(num_tokens, self.topk)


def weighted_sum_into_tokens(rows_RH: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``out[t] = sum of gate_r * rows_RH[r]`` over the rows r of token t (the unpermute)."""
    weighted_RH = rows_RH * rows.gate_of_row_R.to(rows_RH.dtype).unsqueeze(1)
    out_TH = rows_RH.new_zeros((rows.x_TH.shape[0], rows_RH.shape[1]))
    return out_TH.index_add(0, rows.token_of_row_R, weighted_RH)


class Compressor(nn.Module):
    """Base class of all compressors (see the module docstring for the protocol)."""

    name: ClassVar[str] = ""
    """The registry name (``--moe-a2a-compression NAME``)."""
    Options: ClassVar[type] = NoOptions
    """The dataclass of this compressor's settings."""
    codec: Any = None
    """Optional wire codec for the payload (``encode``, ``decode``, ``row_bytes``)."""
    overhead_stages: ClassVar[tuple] = ()
    """Stage-timer names (forward and backward) that are this compressor's own work."""
    tp_shared: ClassVar[bool] = False
    """Under TP (without sequence parallelism), compress all the replicated tokens on every
    TP rank (deterministically, so identically) and let the dispatcher split the payload
    among the TP ranks; False: each TP rank compresses only its share of the tokens."""

    def __init__(self, options: Any = None, *, hidden_size: int = 0, num_experts: int = 0,
                 seed: int = 0, device=None, same_node_E: Optional[torch.Tensor] = None):
        super().__init__()
        self.options = self.Options() if options is None else options
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.same_node_E = same_node_E

    def compress(self, rows: Rows, timer) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Rows -> (payload_PH sorted by expert, payload_per_expert_E, context)."""
        raise NotImplementedError

    def combine(self, expert_out_PH: torch.Tensor, context: Any, rows: Rows,
                timer) -> torch.Tensor:
        """Expert outputs of the payload -> gate-weighted output per token ``[T, H]``.

        The default treats the payload as the rows themselves.
        """
        out_TH = weighted_sum_into_tokens(expert_out_PH, rows)
        timer.lap("unpermute")
        return out_TH

    def statistics(self, context: Any) -> dict:
        """This compressor's statistics of the latest forward (0-dim tensors or numbers)."""
        return {}

    def router_columns(self) -> Optional[torch.Tensor]:
        """Columns ``[H, Q]`` for the router's matmul (None: not needed)."""
        return None

    def set_iteration(self, iteration: int) -> None:
        """Called by the trainer once per iteration."""

    def reset_parameters(self) -> None:
        """(Re)initialise any state (after ``to_empty`` from the meta device)."""
