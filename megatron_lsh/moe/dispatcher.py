"""The expert-parallel token dispatcher: permute -> all-to-all -> experts -> all-to-all -> combine.

Staged like Megatron-core's all-to-all dispatcher, with the communication kept out of the
pre/post steps (so it could overlap with compute later), and the compressor plugged in
between the permutation and the all-to-all:

1. ``dispatch_preprocess``: one row per kept (token, expert) pair, sorted by expert (stable,
   so rows of one expert keep token order); the compressor turns the rows into the payload
   and says how many payload rows go to each expert.
2. ``token_dispatch``: exchange the per-expert payload counts (each rank learns what it will
   receive), then one variable all-to-all of the payload.
3. ``dispatch_postprocess``: received chunks come ordered (source rank, local expert);
   reorder them to (local expert, source rank) so each local expert sees one contiguous block.
4. the local experts run (one grouped MLP).
5. ``combine_preprocess``: undo step 3.
6. ``token_combine``: the reverse all-to-all brings the outputs back to their senders.
7. ``combine_postprocess``: the compressor restores one output per row; rows are weighted by
   their gates and summed into their tokens.

Every rank takes part in every collective even with zero rows, so no configuration of routing
(a rank sending nothing, an expert receiving nothing, an empty batch) can deadlock.
The split sizes are host integers (they size the all-to-all buffers); they are the only
device-to-host transfer of the dispatch, and the statistics are derived from them.

Legend: T tokens, K top-k, H hidden, R rows, P payload rows sent, M payload rows received,
E experts, G EP ranks, X local experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_lsh.moe.compression import (Compressor, NoCompression, Rows,
                                          weighted_sum_into_tokens)
from megatron_lsh.moe.experts import GroupedExperts
from megatron_lsh.moe.router import Routing
from megatron_lsh.moe.stats import MoEStats, StageTimer
from megatron_lsh.parallel.all_to_all import all_to_all, exchange_counts, group_rank, group_size


@dataclass
class DispatchState:
    """What the combine needs to remember from the dispatch."""

    rows: Rows
    context: Any
    input_splits: list
    output_splits: list
    recv_counts: Optional[list] = None
    """Rows received per (source rank s, local expert e), at index ``s * X + e``."""


class AllToAllDispatcher:
    """Moves rows to the ranks that hold their experts and brings the outputs back.

    ``compressor=None`` runs the plain path (no compress / restore calls at all).
    """

    def __init__(self, num_experts: int, ep_group: Optional[dist.ProcessGroup],
                 compressor: Optional[Compressor] = None):
        self.num_experts = num_experts
        self.group = ep_group
        self.ep_size, self.ep_rank = group_size(ep_group), group_rank(ep_group)
        self.num_local_experts = num_experts // self.ep_size
        self.compressor = compressor

    @property
    def codec(self):
        """The compressor's wire codec, if any."""
        return None if self.compressor is None else self.compressor.codec

    # -- dispatch ---------------------------------------------------------------------------

    def dispatch_preprocess(self, x_TH: torch.Tensor, routing: Routing, timer: StageTimer,
                            stats: MoEStats):
        """Step 1: rows sorted by expert, then compressed into the payload."""
        num_tokens, topk = routing.experts_TK.shape
        expert_of_row = routing.experts_TK.reshape(-1)
        slot_of_row = torch.arange(num_tokens * topk, device=x_TH.device)
        gate_of_row = routing.gates_TK.reshape(-1)
        if routing.kept_TK is not None:
            kept = routing.kept_TK.reshape(-1)
            expert_of_row, slot_of_row, gate_of_row = (
                expert_of_row[kept], slot_of_row[kept], gate_of_row[kept])
        order_R = torch.argsort(expert_of_row, stable=True)
        expert_of_row, slot_of_row = expert_of_row[order_R], slot_of_row[order_R]
        rows = Rows(x_TH, expert_of_row, torch.div(slot_of_row, topk, rounding_mode="floor"),
                    gate_of_row[order_R],
                    torch.bincount(expert_of_row, minlength=self.num_experts), slot_of_row, topk,
                    routing.projections_TX)
        stats.tokens, stats.rows = num_tokens, int(slot_of_row.shape[0])
        stats.dropped_rows = num_tokens * topk - stats.rows
        if self.compressor is None or isinstance(self.compressor, NoCompression):
            rows.gather_rows()                          # the row copies are the payload
        timer.lap("permute")

        if self.compressor is None:
            payload_PH, payload_per_expert_E, context = rows.rows_RH, rows.rows_per_expert_E, None
        else:
            payload_PH, payload_per_expert_E, context = self.compressor.compress(rows, timer)
        state = DispatchState(rows, context, [], [])
        return payload_PH, payload_per_expert_E, state

    def token_dispatch(self, payload_PH: torch.Tensor, payload_per_expert_E: torch.Tensor,
                       state: DispatchState, timer: StageTimer) -> torch.Tensor:
        """Step 2: exchange the per-expert counts, then the variable all-to-all of the payload."""
        g = self.ep_size
        send_counts_GX = payload_per_expert_E.view(g, self.num_local_experts)
        recv_counts_GX = exchange_counts(send_counts_GX, self.group)
        # One device-to-host transfer for everything the host needs: the all-to-all splits
        # and the received rows per (source rank, local expert).
        counts = torch.cat([send_counts_GX.sum(1), recv_counts_GX.sum(1),
                            recv_counts_GX.reshape(-1)]).tolist()
        state.input_splits, state.output_splits = counts[:g], counts[g:2 * g]
        state.recv_counts = counts[2 * g:]
        payload_PH = timer.mark(payload_PH, "a2a_bwd", "in")
        recv_MH = all_to_all(payload_PH, state.output_splits, state.input_splits, self.group,
                             self.codec)
        recv_MH = timer.mark(recv_MH, "a2a_bwd", "out")
        timer.lap("a2a")
        return recv_MH

    def dispatch_postprocess(self, recv_MH: torch.Tensor, state: DispatchState
                             ) -> tuple[torch.Tensor, list]:
        """Step 3: (source, local expert) chunks -> (local expert, source); rows per expert."""
        g, x = self.ep_size, self.num_local_experts
        counts = state.recv_counts                      # index s * x + e
        rows_per_local_expert = [sum(counts[s * x + e] for s in range(g)) for e in range(x)]
        if g == 1 or x == 1:
            return recv_MH, rows_per_local_expert
        chunks = torch.split(recv_MH, counts, dim=0)
        expert_major = torch.cat([chunks[s * x + e] for e in range(x) for s in range(g)], dim=0)
        return expert_major, rows_per_local_expert

    # -- combine ----------------------------------------------------------------------------

    def combine_preprocess(self, expert_out_MH: torch.Tensor, state: DispatchState
                           ) -> torch.Tensor:
        """Step 5: back to (source rank, local expert) order."""
        g, x = self.ep_size, self.num_local_experts
        if g == 1 or x == 1:
            return expert_out_MH
        counts = state.recv_counts
        chunks = torch.split(expert_out_MH, [counts[s * x + e] for e in range(x)
                                             for s in range(g)], dim=0)
        return torch.cat([chunks[e * g + s] for s in range(g) for e in range(x)], dim=0)

    def token_combine(self, out_MH: torch.Tensor, state: DispatchState, timer: StageTimer
                      ) -> torch.Tensor:
        """Step 6: the reverse all-to-all."""
        out_MH = timer.mark(out_MH, "a2a_bwd", "in")
        back_PH = all_to_all(out_MH, state.input_splits, state.output_splits, self.group,
                             self.codec)
        back_PH = timer.mark(back_PH, "a2a_bwd", "out")
        timer.lap("a2a")
        return back_PH

    def combine_postprocess(self, back_PH: torch.Tensor, state: DispatchState,
                            timer: StageTimer) -> torch.Tensor:
        """Step 7: restore one output per row, weight by gates, sum into tokens."""
        if self.compressor is not None:
            return self.compressor.combine(back_PH, state.context, state.rows, timer)
        timer.lap("restore")
        out_TH = weighted_sum_into_tokens(back_PH, state.rows)
        timer.lap("unpermute")
        return out_TH

    # -- the whole path ---------------------------------------------------------------------

    def __call__(self, x_TH: torch.Tensor, routing: Routing, experts: GroupedExperts,
                 timer: Optional[StageTimer] = None) -> tuple[torch.Tensor, MoEStats]:
        """Dispatch ``x_TH`` by ``routing``, run ``experts``, combine; returns output and stats."""
        timer = timer or StageTimer(False)
        stats = MoEStats()
        timer.start(stats)
        payload_PH, payload_per_expert_E, state = self.dispatch_preprocess(
            x_TH, routing, timer, stats)
        recv_MH = self.token_dispatch(payload_PH, payload_per_expert_E, state, timer)
        expert_in_MH, rows_per_local_expert = self.dispatch_postprocess(recv_MH, state)
        expert_in_MH = timer.mark(expert_in_MH, "experts_bwd", "in")
        expert_out_MH = experts(expert_in_MH, rows_per_local_expert)
        expert_out_MH = timer.mark(expert_out_MH, "experts_bwd", "out")
        timer.lap("experts")
        out_MH = self.combine_preprocess(expert_out_MH, state)
        back_PH = self.token_combine(out_MH, state, timer)
        out_TH = self.combine_postprocess(back_PH, state, timer)
        self._fill_stats(stats, state, payload_PH)
        return out_TH, stats

    def _fill_stats(self, stats: MoEStats, state: DispatchState,
                    payload_PH: torch.Tensor) -> None:
        """Rows, centroids and bytes from the host-side split sizes (no device sync)."""
        sent, received = state.input_splits, state.output_splits
        stats.centroids = int(sum(sent))
        stats.compression_rate = stats.centroids / stats.rows if stats.rows else 1.0
        hidden, dtype = payload_PH.shape[1], payload_PH.dtype
        codec = self.codec
        row_bytes = codec.row_bytes(hidden, dtype) if codec else hidden * payload_PH.element_size()
        me = self.ep_rank
        rows_out = sum(sent) - sent[me] + sum(received) - received[me]
        rows_all = sum(sent) + sum(received)
        counts_out = 8 * self.num_local_experts * (self.ep_size - 1)
        counts_all = 8 * self.num_experts if self.ep_size > 1 else 0
        stats.bytes_bwd = rows_out * row_bytes
        stats.bytes_bwd_total = rows_all * row_bytes
        stats.bytes_fwd = stats.bytes_bwd + counts_out
        stats.bytes_fwd_total = stats.bytes_bwd_total + counts_all
        if self.compressor is not None:
            stats._cosine = self.compressor.cosine(state.context)
