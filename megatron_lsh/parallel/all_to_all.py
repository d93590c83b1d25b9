"""Expert-parallel collectives with autograd: the variable all-to-all and the TP token split.

* :func:`all_to_all` sends row chunks of variable size to every rank of a group
  (``torch.distributed.all_to_all_single``: on gloo the list form fails on uneven sizes).
  Its backward is the same exchange with input and output splits swapped. An optional
  :class:`WireCodec` encodes what goes on the wire (e.g. bf16 or fp8 rows) in both directions,
  so gradients travel in the same format as activations.
* :func:`exchange_counts` tells every rank how many rows it will receive (the split sizes are
  exchanged before the rows, so the receiver can size its buffer).
* :func:`split_to_tp` / :func:`gather_from_tp` cut the tokens that are replicated on the ranks
  of a tensor-parallel group into one share per rank before the dispatch, and put the shares
  back together after it, so that no token crosses the network twice.

A group that is ``None`` (or of size 1) makes every function here the identity (apart from the
codec round trip, which is kept so numerics do not depend on the number of ranks).

Legend: P rows sent, M rows received, T tokens, H hidden (or any trailing shape).
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch
import torch.distributed as dist


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Size of ``group``; 1 for ``None`` (no torch.distributed, or a one-rank group)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    """This rank's index in ``group``; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


class WireCodec(Protocol):
    """How rows are encoded for the wire; applied to activations and to their gradients.

    ``segments``: row counts of consecutive runs of rows that belong together (per destination
    and expert), summing to P; a codec may send ``header_rows`` extra rows per non-empty
    segment (e.g. the segment's mean).
    """

    header_rows: int

    def encode(self, x_PH: torch.Tensor, segments: Sequence[int]) -> torch.Tensor:
        """Rows -> wire tensor of ``wire_rows(self, segments)`` rows (any dtype gloo/NCCL can
        send)."""

    def decode(self, wire_W: torch.Tensor, segments: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        """Wire tensor -> the ``sum(segments)`` rows, of ``dtype``."""

    def row_bytes(self, hidden: int, dtype: torch.dtype) -> int:
        """Bytes one encoded row of width ``hidden`` takes on the wire."""


def wire_rows(codec: Optional[WireCodec], segments: Sequence[int]) -> int:
    """Rows ``segments`` take on the wire under ``codec`` (None: no codec), headers included."""
    header = getattr(codec, "header_rows", 0) if codec is not None else 0
    return int(sum(segments)) + header * sum(1 for count in segments if count > 0)


def wire_splits(codec: Optional[WireCodec], splits: Sequence[int],
                segments: Sequence[int]) -> list:
    """Wire rows per peer: ``segments`` divide each split into equally many runs."""
    per_peer = len(segments) // max(len(splits), 1)
    return [wire_rows(codec, segments[r * per_peer:(r + 1) * per_peer])
            for r in range(len(splits))]


def _exchange(x_PH: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
              group: Optional[dist.ProcessGroup], codec: Optional[WireCodec],
              output_segments: Sequence[int], input_segments: Sequence[int]) -> torch.Tensor:
    """One all-to-all of (encoded) rows; no autograd."""
    dtype = x_PH.dtype
    wire = codec.encode(x_PH, input_segments) if codec is not None else x_PH
    if group_size(group) > 1:
        wire = wire.contiguous()
        recv_splits = wire_splits(codec, output_splits, output_segments)
        out = wire.new_empty((int(sum(recv_splits)),) + tuple(wire.shape[1:]))
        dist.all_to_all_single(out, wire, recv_splits,
                               wire_splits(codec, input_splits, input_segments), group=group)
    else:
        out = wire
    return codec.decode(out, output_segments, dtype) if codec is not None else out


class _AllToAll(torch.autograd.Function):
    """Variable all-to-all; the backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x_PH, output_splits, input_splits, group, codec, output_segments,
                input_segments):
        ctx.splits = (output_splits, input_splits, output_segments, input_segments)
        ctx.group, ctx.codec = group, codec
        return _exchange(x_PH, output_splits, input_splits, group, codec, output_segments,
                         input_segments)

    @staticmethod
    def backward(ctx, grad_MH):
        output_splits, input_splits, output_segments, input_segments = ctx.splits
        # Swapped: what this rank received in the forward it now sends back as gradient.
        grad_PH = _exchange(grad_MH.contiguous(), input_splits, output_splits, ctx.group,
                            ctx.codec, input_segments, output_segments)
        return grad_PH, None, None, None, None, None, None


def all_to_all(x_PH: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
               group: Optional[dist.ProcessGroup], codec: Optional[WireCodec] = None,
               output_segments: Optional[Sequence[int]] = None,
               input_segments: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Send ``input_splits[r]`` consecutive rows of ``x_PH`` to rank r; receive ``output_splits``.

    Differentiable (backward = the reverse exchange). ``input_segments`` / ``output_segments``
    divide every split into the same number of runs (per expert) for the codec; default: one
    run per split. Without a group and codec it returns ``x_PH`` itself.
    """
    if group_size(group) == 1 and codec is None:
        return x_PH
    output_segments = list(output_splits if output_segments is None else output_segments)
    input_segments = list(input_splits if input_segments is None else input_segments)
    return _AllToAll.apply(x_PH, list(output_splits), list(input_splits), group, codec,
                           output_segments, input_segments)


def exchange_counts(send_counts_RK: torch.Tensor,
                    group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Row r of ``send_counts_RK`` goes to rank r; returns row s = what rank s sends to us.

    Used to exchange per-expert row counts (``K`` local experts per rank) before the rows,
    so each receiver knows its output split sizes. Integer tensor, no autograd.
    """
    if group_size(group) == 1:
        return send_counts_RK.clone()
    send = send_counts_RK.contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def tp_share_sizes(num_tokens: int, tp_size: int) -> list[int]:
    """Tokens of each TP rank's share: as equal as possible, the first ones one larger."""
    base, extra = divmod(num_tokens, tp_size)
    return [base + (1 if r < extra else 0) for r in range(tp_size)]


def _all_gather_rows(x_TH: torch.Tensor, sizes: list[int],
                     group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather row shares of uneven sizes (padded to the largest, then trimmed)."""
    width = max(sizes)
    padded = x_TH.new_zeros((width,) + tuple(x_TH.shape[1:]))
    padded[: x_TH.shape[0]] = x_TH
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def _own_share(x_TH: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x_TH[start:start + sizes[rank]]


class _SplitToTP(torch.autograd.Function):
    """Forward: keep this rank's share of replicated tokens. Backward: all-gather the shares.

    The input is identical on every TP rank and each rank's share is used by that rank only,
    so the full gradient is the concatenation of the share gradients.
    """

    @staticmethod
    def forward(ctx, x_TH, group, rank, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _own_share(x_TH, sizes, rank).clone()

    @staticmethod
    def backward(ctx, grad_share):
        return _all_gather_rows(grad_share.contiguous(), ctx.sizes, ctx.group), None, None, None


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather the shares. Backward: keep this rank's share of the gradient.

    The gathered output is used identically on all TP ranks, so the incoming gradient is the
    same everywhere and each rank owns exactly the slice that belongs to its share.
    """

    @staticmethod
    def forward(ctx, x_share, group, rank, sizes):
        ctx.rank, ctx.sizes = rank, sizes
        return _all_gather_rows(x_share.contiguous(), sizes, group)

    @staticmethod
    def backward(ctx, grad_TH):
        return _own_share(grad_TH, ctx.sizes, ctx.rank).clone(), None, None, None


def split_to_tp(x_TH: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """This TP rank's share of tokens that are replicated over ``group`` (autograd-correct)."""
    size = group_size(group)
    if size == 1:
        return x_TH
    return _SplitToTP.apply(x_TH, group, group_rank(group), tp_share_sizes(x_TH.shape[0], size))


def gather_from_tp(x_share: torch.Tensor, num_tokens: int,
                   group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Reassemble the ``num_tokens`` replicated tokens from the TP shares (autograd-correct)."""
    size = group_size(group)
    if size == 1:
        return x_share
    return _GatherFromTP.apply(x_share, group, group_rank(group), tp_share_sizes(num_tokens, size))


def tp_row_shares(counts_E: Sequence[int], tp_size: int
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split rows grouped in consecutive blocks of ``counts_E`` among ``tp_size`` ranks.

    Rank t gets, of every block e, the rows ``[c_e * t // tp, c_e * (t + 1) // tp)`` of that
    block, so each block (an expert's payload) is shared as evenly as possible and every rank
    keeps block order. Returns the row indices of each rank (int64) and each rank's rows per
    block (``[E]``).
    """
    counts = torch.tensor(list(counts_E), dtype=torch.int64)
    offsets = torch.cumsum(counts, 0) - counts
    shares, share_counts = [], []
    for t in range(tp_size):
        starts = offsets + counts * t // tp_size
        lengths = offsets + counts * (t + 1) // tp_size - starts
        total = int(lengths.sum())
        within = torch.arange(total) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths,
                                                               lengths)
        shares.append(torch.repeat_interleave(starts, lengths) + within)
        share_counts.append(lengths)
    return shares, share_counts


class _SplitRowsToTP(torch.autograd.Function):
    """Forward: this rank's rows (by index) of a tensor replicated over TP. Backward: the
    shares' gradients all-gathered and put back in place (each row is in exactly one share)."""

    @staticmethod
    def forward(ctx, x_PH, group, rank, shares):
        ctx.group, ctx.shares, ctx.total = group, shares, x_PH.shape[0]
        return x_PH.index_select(0, shares[rank].to(x_PH.device))

    @staticmethod
    def backward(ctx, grad_share):
        sizes = [int(s.numel()) for s in ctx.shares]
        gathered = _all_gather_rows(grad_share.contiguous(), sizes, ctx.group)
        order = torch.cat(ctx.shares).to(gathered.device)
        full = gathered.new_empty((ctx.total,) + tuple(gathered.shape[1:]))
        full[order] = gathered
        return full, None, None, None


class _GatherRowsFromTP(torch.autograd.Function):
    """Forward: all-gather the TP shares and put every row back in place. Backward: keep this
    rank's rows of the (replicated, identical) gradient."""

    @staticmethod
    def forward(ctx, x_share, group, rank, shares):
        ctx.rank, ctx.shares = rank, shares
        sizes = [int(s.numel()) for s in shares]
        gathered = _all_gather_rows(x_share.contiguous(), sizes, group)
        order = torch.cat(shares).to(gathered.device)
        full = gathered.new_empty((sum(sizes),) + tuple(gathered.shape[1:]))
        full[order] = gathered
        return full

    @staticmethod
    def backward(ctx, grad_PH):
        return grad_PH.index_select(0, ctx.shares[ctx.rank].to(grad_PH.device)), None, None, None


def split_rows_to_tp(x_PH: torch.Tensor, shares: list, group: Optional[dist.ProcessGroup]
                     ) -> torch.Tensor:
    """This TP rank's rows ``shares[rank]`` of ``x_PH``, replicated over ``group``."""
    if group_size(group) == 1:
        return x_PH
    return _SplitRowsToTP.apply(x_PH, group, group_rank(group), shares)


def gather_rows_from_tp(x_share: torch.Tensor, shares: list,
                        group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Every rank's share put back into the full (replicated) rows; inverse of the split."""
    if group_size(group) == 1:
        return x_share
    return _GatherRowsFromTP.apply(x_share, group, group_rank(group), shares)
