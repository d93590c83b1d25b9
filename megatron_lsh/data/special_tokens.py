"""The token ids a dataset needs, decoupled from the tokenizer object (picklable, tiny)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

import numpy as np

from .errors import DataError


@dataclass(frozen=True)
class SpecialTokenIds:
    """Vocabulary size and special-token ids; build with :meth:`from_tokenizer`.

    ``cls`` opens an MLM sample and starts the T5 decoder; ``sep`` closes an MLM sample and
    separates documents inside packed samples; ``eod`` ends T5 targets; ``sentinels`` are the
    T5 ``<extra_id_*>`` ids.
    """

    vocab_size: int
    pad: int
    cls: int
    sep: int
    mask: int
    eod: int
    sentinels: Tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for name in ("pad", "cls", "sep", "mask", "eod"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise DataError(f"special token {name} = {value} is outside the vocabulary of size {self.vocab_size}")
        object.__setattr__(self, "sentinels", tuple(int(s) for s in self.sentinels))

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokenIds":
        """Take the ids from any :class:`~megatron_lsh.tokenizer.AbstractTokenizer`."""
        return cls(vocab_size=tokenizer.vocab_size, pad=tokenizer.pad, cls=tokenizer.cls,
                   sep=tokenizer.sep, mask=tokenizer.mask, eod=tokenizer.eod,
                   sentinels=tuple(tokenizer.additional_special_tokens_ids))

    @property
    def all_ids(self) -> np.ndarray:
        """Every special id (sorted, unique)."""
        return np.unique(np.asarray([self.pad, self.cls, self.sep, self.mask, self.eod,
                                     *self.sentinels], dtype=np.int64))
