"""``cast``: every row crosses the all-to-all in a narrower wire format (bf16, or fp8 + scale;
optionally centred on each expert's mean row, see ``codecs.py``).

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

    dtype: str = setting(
        "bf16", "--moe-cast-dtype", "Wire format of the cast compressor: bf16, fp8 (e4m3 + "
        "a per-row scale), or their -centered forms (each expert's mean row sent once in two "
        "header rows, every row as its deviation from it: for rows that share a large common "
        "component).", choices=tuple(CODECS))

    def __post_init__(self):
        check_choice(self, "dtype")


@register_compressor
class CastCompressor(NoCompression):
    """Send every row in a narrower wire format (bf16, or fp8 with a per-row scale, optionally
    as deviations from the expert's mean row)."""

    name = "cast"
    Options = CastOptions

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        self.codec = CODECS[self.options.dtype]()

    def extra_repr(self) -> str:
        return f"dtype={self.options.dtype}"
