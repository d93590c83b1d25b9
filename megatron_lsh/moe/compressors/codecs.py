"""Wire codecs: how payload rows are encoded on the all-to-all (forward and backward).

A codec has ``encode(x_PH, segments) -> wire``, ``decode(wire, segments, dtype) -> x_PH``,
``row_bytes(hidden, dtype)`` and ``header_rows``; the all-to-all applies it to the payload and,
in the backward, to the gradients, treating the round trip as the identity (straight-through).
Used by ``cast`` (every row) and stackable under ``lsh`` (its centroids).

``segments`` are the row counts of consecutive runs of rows that belong together (one run per
(destination rank, expert) on the way out, per (source rank, local expert) on the way back),
summing to P. Per-row codecs ignore them (``header_rows = 0``). The centred codecs send, for
every non-empty segment, its mean row in ``header_rows`` extra wire rows ahead of the segment,
and each row's deviation from that mean: when the rows of an expert share a large common
component (as RoBERTa-MoE's do: ~99% of their energy), an fp8 rounding error relative to the
row would be as large as the part that tells tokens apart; relative to the deviation it is not.
Segments are per expert, so the encoding of a row does not depend on how experts are laid out
over ranks.

Legend: P payload rows, S segments, N non-empty segments, H hidden, B bytes per wire row.
"""
from __future__ import annotations

from typing import Sequence

import torch

_FP8_MAX = 448.0  # largest finite float8 e4m3fn value


class Bf16Codec:
    """Rows travel as bfloat16 (2 bytes per value)."""

    header_rows = 0

    def encode(self, x_PH: torch.Tensor, segments: Sequence[int] = ()) -> torch.Tensor:
        """Round to bf16."""
        return x_PH.to(torch.bfloat16)

    def decode(self, wire_PH: torch.Tensor, segments: Sequence[int] = (),
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Widen back to the compute dtype."""
        return wire_PH.to(dtype)

    def row_bytes(self, hidden: int, dtype: torch.dtype) -> int:
        """Two bytes per value."""
        return 2 * hidden


class Fp8Codec:
    """Rows travel as float8 e4m3fn bytes plus one fp32 scale per row: ``[P, H + 4]`` uint8."""

    header_rows = 0

    def encode(self, x_PH: torch.Tensor, segments: Sequence[int] = ()) -> torch.Tensor:
        """Scale each row so its largest magnitude is 448, cast to e4m3, append the scale."""
        xf = x_PH.float()
        amax_P1 = xf.abs().amax(dim=-1, keepdim=True) if xf.shape[1] else xf.new_zeros(
            (xf.shape[0], 1))
        scale_P1 = torch.where(amax_P1 > 0, amax_P1 / _FP8_MAX, torch.ones_like(amax_P1))
        q_PH = (xf / scale_P1).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.cat([q_PH, scale_P1.contiguous().view(torch.uint8)], dim=1)

    def decode(self, wire_PB: torch.Tensor, segments: Sequence[int] = (),
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Bytes -> e4m3 values times their row's scale."""
        hidden = wire_PB.shape[1] - 4
        q_PH = wire_PB[:, :hidden].contiguous().view(torch.float8_e4m3fn)
        scale_P1 = wire_PB[:, hidden:].contiguous().view(torch.float32)
        return (q_PH.float() * scale_P1).to(dtype)

    def row_bytes(self, hidden: int, dtype: torch.dtype) -> int:
        """One byte per value plus a 4-byte scale."""
        return hidden + 4


class CenteredCodec:
    """Per segment: its mean row (two wire rows: the mean and its rounding error, each in the
    inner format, so the mean arrives with about twice the inner precision), then every row's
    deviation from the mean in the inner format."""

    header_rows = 2

    def __init__(self, inner):
        self.inner = inner

    @staticmethod
    def _layout(segments: Sequence[int], device) -> tuple:
        """Segment of each payload row, wire position of each payload row, wire position of
        each non-empty segment's first header row, and the non-empty segments' indices."""
        counts_S = torch.tensor(list(segments), dtype=torch.long, device=device)
        segment_of_row_P = torch.repeat_interleave(
            torch.arange(counts_S.numel(), device=device), counts_S)
        nonempty_S = counts_S > 0
        headers_before_S = 2 * torch.cumsum(nonempty_S.long(), 0)     # headers up to and with s
        row_pos_P = (torch.arange(segment_of_row_P.numel(), device=device)
                     + headers_before_S[segment_of_row_P])
        start_S = torch.cumsum(counts_S, 0) - counts_S + headers_before_S - 2
        nonempty_N = nonempty_S.nonzero().view(-1)
        return segment_of_row_P, row_pos_P, start_S[nonempty_N], nonempty_N

    def encode(self, x_PH: torch.Tensor, segments: Sequence[int]) -> torch.Tensor:
        """Means (hi, lo) of the non-empty segments ahead of each, then the deviations."""
        xf = x_PH.float()
        segments = list(segments)
        segment_P, row_pos_P, header_pos_N, nonempty_N = self._layout(segments, xf.device)
        counts_S1 = torch.tensor(segments, dtype=xf.dtype, device=xf.device).clamp(min=1)
        mean_SH = xf.new_zeros((len(segments), xf.shape[1])).index_add_(
            0, segment_P, xf) / counts_S1.unsqueeze(1)
        mean_NH = mean_SH[nonempty_N]
        hi_NB = self.inner.encode(mean_NH)
        lo_NB = self.inner.encode(mean_NH - self.inner.decode(hi_NB, dtype=torch.float32))
        body_PB = self.inner.encode(xf - mean_SH[segment_P])
        wire = body_PB.new_empty((body_PB.shape[0] + 2 * nonempty_N.numel(), body_PB.shape[1]))
        wire[row_pos_P] = body_PB
        wire[header_pos_N] = hi_NB
        wire[header_pos_N + 1] = lo_NB
        return wire

    def decode(self, wire_WB: torch.Tensor, segments: Sequence[int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Deviations plus their segment's mean (hi + lo); ``segments`` counts payload rows."""
        segments = list(segments)
        segment_P, row_pos_P, header_pos_N, nonempty_N = self._layout(segments, wire_WB.device)
        dev_PH = self.inner.decode(wire_WB[row_pos_P], dtype=torch.float32)
        mean_NH = (self.inner.decode(wire_WB[header_pos_N], dtype=torch.float32)
                   + self.inner.decode(wire_WB[header_pos_N + 1], dtype=torch.float32))
        mean_SH = dev_PH.new_zeros((len(segments), dev_PH.shape[1]))
        mean_SH[nonempty_N] = mean_NH
        return (dev_PH + mean_SH[segment_P]).to(dtype)

    def row_bytes(self, hidden: int, dtype: torch.dtype) -> int:
        """As the inner format (the headers are counted per segment by the dispatcher)."""
        return self.inner.row_bytes(hidden, dtype)


CODECS = {"bf16": Bf16Codec, "fp8": Fp8Codec,
          "bf16-centered": lambda: CenteredCodec(Bf16Codec()),
          "fp8-centered": lambda: CenteredCodec(Fp8Codec())}
"""Wire formats by name (``--moe-cast-dtype``, ``--moe-lsh-wire-dtype``)."""
