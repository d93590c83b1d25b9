"""``none``: the dense baseline, every (token, expert) row crosses the all-to-all as it is."""
from __future__ import annotations

from megatron_lsh.moe.compressors import register_compressor
from megatron_lsh.moe.compressors.base import Compressor


@register_compressor
class NoCompression(Compressor):
    """Send every row; the combine is the plain gate-weighted sum into tokens."""

    name = "none"

    def compress(self, rows, timer):
        """The payload is the rows themselves (their copies are the permutation's output)."""
        payload_RH = rows.rows_RH
        timer.lap("permute")
        return payload_RH, rows.rows_per_expert_E, None
