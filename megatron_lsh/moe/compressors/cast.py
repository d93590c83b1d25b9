"""``cast``: every row crosses the all-to-all in a narrower wire format (bf16, or fp8 + scale).

The FP8-dispatch baseline other systems use. The backward sends the gradients encoded the
same way and treats the round trip as the identity (straight-through): the gradient is that
of the unquantised computation, evaluated with quantised wire values.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_lsh.config import check_choice, setting
from megatron_lsh.moe.compressors import register_compressor
from megatron_lsh.moe.compressors.codecs import CODECS
from megatron_lsh.moe.compressors.none import NoCompression


@dataclass
class CastOptions:
    """Settings of the ``cast`` compressor."""

    dtype: str = setting("bf16", "--moe-cast-dtype", "Wire dtype of the cast compressor.",
                         choices=tuple(CODECS))

    def __post_init__(self):
        check_choice(self, "dtype")


@register_compressor
class CastCompressor(NoCompression):
    """Send every row in a narrower wire format (bf16, or fp8 with a per-row scale)."""

    name = "cast"
    Options = CastOptions

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        self.codec = CODECS[self.options.dtype]()

    def extra_repr(self) -> str:
        return f"dtype={self.options.dtype}"
