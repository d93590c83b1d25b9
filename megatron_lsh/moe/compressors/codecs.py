"""Wire codecs: how payload rows are encoded on the all-to-all (forward and backward).

A codec has ``encode(x_PH) -> wire``, ``decode(wire, dtype) -> x_PH`` and
``row_bytes(hidden, dtype)``; the all-to-all applies it to the payload and, in the backward,
to the gradients, treating the round trip as the identity (straight-through). Used by
``cast`` (every row) and stackable under ``lsh`` (its centroids).

Legend: P payload rows, H hidden, B bytes per row.
"""
from __future__ import annotations

import torch

_FP8_MAX = 448.0  # largest finite float8 e4m3fn value


class Bf16Codec:
    """Rows travel as bfloat16 (2 bytes per value)."""

    def encode(self, x_PH: torch.Tensor) -> torch.Tensor:
        """Round to bf16."""
        return x_PH.to(torch.bfloat16)

    def decode(self, wire_PH: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Widen back to the compute dtype."""
        return wire_PH.to(dtype)

    def row_bytes(self, hidden: int, dtype: torch.dtype) -> int:
        """Two bytes per value."""
        return 2 * hidden


class Fp8Codec:
    """Rows travel as float8 e4m3fn bytes plus one fp32 scale per row: ``[P, H + 4]`` uint8."""

    def encode(self, x_PH: torch.Tensor) -> torch.Tensor:
        """Scale each row so its largest magnitude is 448, cast to e4m3, append the scale."""
        xf = x_PH.float()
        amax_P1 = xf.abs().amax(dim=-1, keepdim=True) if xf.shape[1] else xf.new_zeros(
            (xf.shape[0], 1))
        scale_P1 = torch.where(amax_P1 > 0, amax_P1 / _FP8_MAX, torch.ones_like(amax_P1))
        q_PH = (xf / scale_P1).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.cat([q_PH, scale_P1.contiguous().view(torch.uint8)], dim=1)

    def decode(self, wire_PB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Bytes -> e4m3 values times their row's scale."""
        hidden = wire_PB.shape[1] - 4
        q_PH = wire_PB[:, :hidden].contiguous().view(torch.float8_e4m3fn)
        scale_P1 = wire_PB[:, hidden:].contiguous().view(torch.float32)
        return (q_PH.float() * scale_P1).to(dtype)

    def row_bytes(self, hidden: int, dtype: torch.dtype) -> int:
        """One byte per value plus a 4-byte scale."""
        return hidden + 4


CODECS = {"bf16": Bf16Codec, "fp8": Fp8Codec}
