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
7. ``combine_postprocess``: the compressor turns the returned payload into one gate-weighted
   output per token (for ``none``: rows weighted by their gates and summed into tokens).

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

from megatron_lsh.moe.compressors import Compressor, Rows
from megatron_lsh.moe.experts import GroupedExperts
from megatron_lsh.moe.router import Routing
from megatron_lsh.moe.stats import MoEStats, StageTimer
from megatron_lsh.parallel.all_to_all import (all_to_all, exchange_counts, gather_rows_from_tp,
                                              group_rank, group_size, split_rows_to_tp,
                                              tp_row_shares, tp_share_sizes, wire_splits)


@dataclass
class DispatchState:
    """What the combine needs to remember from the dispatch."""

    rows: Rows
    context: Any
    input_splits: list
    output_splits: list
    recv_counts: Optional[list] = None
    """Rows received per (source rank s, local expert e), at index ``s * X + e``."""
    send_counts: Optional[list] = None
    """Rows sent per (destination rank d, its local expert e), at index ``d * X + e``."""
    tp_shares: Optional[list] = None
    """With a TP-shared payload: the payload rows of each TP rank."""


class AllToAllDispatcher:
    """Moves rows to the ranks that hold their experts and brings the outputs back.

    It knows only the compressor protocol (``moe/compressors/base.py``).
    """

    def __init__(self, num_experts: int, ep_group: Optional[dist.ProcessGroup],
                 compressor: Compressor):
        self.num_experts = num_experts
        self.group = ep_group
        self.ep_size, self.ep_rank = group_size(ep_group), group_rank(ep_group)
        self.num_local_experts = num_experts // self.ep_size
        self.compressor = compressor

    @property
    def codec(self):
        """The compressor's wire codec, if any."""
        return self.compressor.codec

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
                    routing.columns_TQ)
        stats.tokens, stats.rows = num_tokens, int(slot_of_row.shape[0])
        stats.dropped_rows = num_tokens * topk - stats.rows
        stats.overhead_stages = self.compressor.overhead_stages
        # The compressor's first lap ("permute") closes the permutation: a compressor that
        # needs the row copies gathers them before it.
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
                            recv_counts_GX.reshape(-1), send_counts_GX.reshape(-1)]).tolist()
        state.input_splits, state.output_splits = counts[:g], counts[g:2 * g]
        cells = g * self.num_local_experts
        state.recv_counts = counts[2 * g:2 * g + cells]
        state.send_counts = counts[2 * g + cells:]
        payload_PH = timer.mark(payload_PH, "a2a_bwd", "in")
        recv_MH = all_to_all(payload_PH, state.output_splits, state.input_splits, self.group,
                             self.codec, state.recv_counts, state.send_counts)
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
                             self.codec, state.send_counts, state.recv_counts)
        back_PH = timer.mark(back_PH, "a2a_bwd", "out")
        timer.lap("a2a")
        return back_PH

    def combine_postprocess(self, back_PH: torch.Tensor, state: DispatchState,
                            timer: StageTimer) -> torch.Tensor:
        """Step 7: the compressor turns the returned payload into the tokens' outputs."""
        return self.compressor.combine(back_PH, state.context, state.rows, timer)

    # -- the whole path ---------------------------------------------------------------------

    def share_payload_over_tp(self, payload_PH: torch.Tensor, payload_per_expert_E: torch.Tensor,
                              state: DispatchState, tp_group) -> tuple[torch.Tensor,
                                                                       torch.Tensor]:
        """Step 1b (TP-shared payload): every TP rank built the same payload from the same
        (replicated) tokens; each sends only its share of every expert's payload rows."""
        state.tp_shares, share_counts = tp_row_shares(payload_per_expert_E.tolist(),
                                                      group_size(tp_group))
        return (split_rows_to_tp(payload_PH, state.tp_shares, tp_group),
                share_counts[group_rank(tp_group)].to(payload_per_expert_E.device))

    def __call__(self, x_TH: torch.Tensor, routing: Routing, experts: GroupedExperts,
                 timer: Optional[StageTimer] = None, tp_group=None
                 ) -> tuple[torch.Tensor, MoEStats]:
        """Dispatch ``x_TH`` by ``routing``, run ``experts``, combine; returns output and stats.

        ``tp_group``: the tokens are replicated over this TP group and the compressor is
        ``tp_shared``: every TP rank compresses all of them identically and sends only its
        share of the payload; the returned outputs are all-gathered over TP before the combine.
        """
        timer = timer or StageTimer(False)
        stats = MoEStats()
        timer.start(stats)
        payload_PH, payload_per_expert_E, state = self.dispatch_preprocess(
            x_TH, routing, timer, stats)
        full_payload_PH = payload_PH
        if group_size(tp_group) > 1:
            payload_PH, payload_per_expert_E = self.share_payload_over_tp(
                payload_PH, payload_per_expert_E, state, tp_group)
        recv_MH = self.token_dispatch(payload_PH, payload_per_expert_E, state, timer)
        expert_in_MH, rows_per_local_expert = self.dispatch_postprocess(recv_MH, state)
        expert_in_MH = timer.mark(expert_in_MH, "experts_bwd", "in")
        expert_out_MH = experts(expert_in_MH, rows_per_local_expert)
        expert_out_MH = timer.mark(expert_out_MH, "experts_bwd", "out")
        timer.lap("experts")
        out_MH = self.combine_preprocess(expert_out_MH, state)
        back_PH = self.token_combine(out_MH, state, timer)
        if state.tp_shares is not None:
            back_PH = gather_rows_from_tp(back_PH, state.tp_shares, tp_group)
            timer.lap("tp_gather")
        out_TH = self.combine_postprocess(back_PH, state, timer)
        self._fill_stats(stats, state, payload_PH)
        if state.tp_shares is not None:
            self._share_stats_over_tp(stats, state, full_payload_PH, group_rank(tp_group))
        return out_TH, stats

    @staticmethod
    def _share_stats_over_tp(stats: MoEStats, state: DispatchState, full_payload_PH,
                             tp_rank: int) -> None:
        """Per-rank shares of replicated counts (so sums over ranks count each row once), and
        the TP all-gather of the returned payload (forward) and of its gradient (backward)."""
        tp = len(state.tp_shares)
        stats.tokens = tp_share_sizes(stats.tokens, tp)[tp_rank]
        stats.dropped_rows = tp_share_sizes(stats.dropped_rows, tp)[tp_rank]
        stats.rows = tp_share_sizes(stats.rows, tp)[tp_rank]
        stats.compression_rate = stats.sent_rows / stats.rows if stats.rows else 1.0
        others = full_payload_PH.shape[0] - state.tp_shares[tp_rank].numel()
        gathered = others * full_payload_PH.shape[1] * full_payload_PH.element_size()
        stats.tp_bytes = gathered
        for name in ("bytes_fwd", "bytes_bwd", "bytes_fwd_total", "bytes_bwd_total"):
            setattr(stats, name, getattr(stats, name) + gathered)

    def _fill_stats(self, stats: MoEStats, state: DispatchState,
                    payload_PH: torch.Tensor) -> None:
        """Rows, rows sent and bytes from the host-side split sizes (no device sync)."""
        sent, received = state.input_splits, state.output_splits
        stats.sent_rows = int(sum(sent))
        stats.compression_rate = stats.sent_rows / stats.rows if stats.rows else 1.0
        hidden, dtype = payload_PH.shape[1], payload_PH.dtype
        codec = self.codec
        row_bytes = codec.row_bytes(hidden, dtype) if codec else hidden * payload_PH.element_size()
        # Wire rows per peer, with the codec's per-(peer, expert) header rows.
        sent = wire_splits(codec, sent, state.send_counts)
        received = wire_splits(codec, received, state.recv_counts)
        me = self.ep_rank
        rows_out = sum(sent) - sent[me] + sum(received) - received[me]
        rows_all = sum(sent) + sum(received)
        counts_out = 8 * self.num_local_experts * (self.ep_size - 1)
        counts_all = 8 * self.num_experts if self.ep_size > 1 else 0
        stats.bytes_bwd = rows_out * row_bytes
        stats.bytes_bwd_total = rows_all * row_bytes
        stats.bytes_fwd = stats.bytes_bwd + counts_out
        stats.bytes_fwd_total = stats.bytes_bwd_total + counts_all
        stats.extra = self.compressor.statistics(state.context)
