"""RoBERTa masked-LM dataset: full sentences packed to ``seq_length``, dynamic 15% masking.

A sample is ``[cls] sentences... [sep]`` (documents inside it separated by ``sep``), padded
to ``seq_length``. Masking, per sample:

1. candidates are the positions whose token is not special (cls, sep, pad, mask, eod,
   sentinels are never masked);
2. ``max(1, round(mask_prob * candidates))`` of them are chosen uniformly;
3. each chosen position becomes ``mask`` with probability 0.8, a random non-special token
   with probability 0.1, and stays unchanged otherwise.

The masking generator is seeded by (seed, sample index), and each epoch's copy of a
sentence span is a different sample index, so every epoch sees a new mask (RoBERTa's
dynamic masking) while a resumed run sees exactly the masks it would have seen.

Item i: ``tokens`` (int64, masked input), ``labels`` (int64, the original tokens; only the
positions with ``loss_mask`` 1 count), ``loss_mask`` (float32), ``padding_mask`` (int64,
1 for real tokens, 0 for padding).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from .errors import DataError
from .indexed import IndexedDataset
from .sentence_samples import SentenceSpanSamples
from .special_tokens import SpecialTokenIds

MASK_REPLACE_PROB = 0.8
RANDOM_REPLACE_PROB = 0.1


class MLMDataset(SentenceSpanSamples):
    """Masked-LM samples over documents ``[first, end)`` of a (sentence-level) indexed dataset.

    Args:
        indexed, document_range, num_samples, seed: as for :class:`GPTDataset`.
        seq_length: tokens per sample, cls and sep included.
        special: the tokenizer's :class:`SpecialTokenIds`.
        mask_prob: fraction of candidate tokens to predict (0.15).
        short_seq_prob, cross_documents, name, cache_dir, group, log: see
            :class:`SentenceSpanSamples`.
    """

    kind = "mlm"
    needs_special_tokens = True  # cls / sep / mask / sentinel ids come from the tokenizer

    def __init__(self, indexed: Union[str, IndexedDataset], document_range: Optional[Tuple[int, int]],
                 num_samples: Optional[int], seq_length: int, seed: int, special: SpecialTokenIds, *,
                 mask_prob: float = 0.15, short_seq_prob: float = 0.0, cross_documents: bool = True,
                 name: str = "train", cache_dir: Optional[str] = None, group=None, log=None):
        if seq_length < 4:
            raise DataError(f"MLM seq_length must be at least 4, got {seq_length}")
        if not 0.0 < mask_prob < 1.0:
            raise DataError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.seq_length = int(seq_length)
        self.special = special
        self.mask_prob = float(mask_prob)
        self._special_ids = special.all_ids
        self._random_pool = np.setdiff1d(np.arange(special.vocab_size, dtype=np.int64), self._special_ids)
        if len(self._random_pool) == 0:
            raise DataError("the vocabulary has no non-special token to use for random replacement")
        super().__init__(indexed, document_range, num_samples, self.seq_length - 2, seed, special.sep,
                         name=name, short_seq_prob=short_seq_prob, cross_documents=cross_documents,
                         cache_dir=cache_dir, group=group, log=log)

    def masked_sample(self, idx: int) -> Dict[str, np.ndarray]:
        """Unpadded numpy arrays of sample ``idx``: tokens, labels, loss_mask."""
        sp = self.special
        content = self.content(idx)
        original = np.concatenate([[sp.cls], content, [sp.sep]]).astype(np.int64)
        tokens = original.copy()
        loss_mask = np.zeros(len(tokens), dtype=np.float32)
        candidates = np.flatnonzero(~np.isin(original, self._special_ids))
        if len(candidates):
            rng = self.sample_rng(idx)
            count = max(1, int(round(self.mask_prob * len(candidates))))
            chosen = rng.choice(candidates, size=count, replace=False)
            action = rng.random(count)
            to_mask = chosen[action < MASK_REPLACE_PROB]
            to_random = chosen[(action >= MASK_REPLACE_PROB)
                               & (action < MASK_REPLACE_PROB + RANDOM_REPLACE_PROB)]
            tokens[to_mask] = sp.mask
            tokens[to_random] = rng.choice(self._random_pool, size=len(to_random))
            loss_mask[chosen] = 1.0
        return {"tokens": tokens, "labels": original, "loss_mask": loss_mask}

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        sample = self.masked_sample(int(idx))
        n, pad = len(sample["tokens"]), self.seq_length - len(sample["tokens"])
        tokens = np.pad(sample["tokens"], (0, pad), constant_values=self.special.pad)
        labels = np.pad(sample["labels"], (0, pad), constant_values=self.special.pad)
        loss_mask = np.pad(sample["loss_mask"], (0, pad))
        padding_mask = np.zeros(self.seq_length, dtype=np.int64)
        padding_mask[:n] = 1
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask), "padding_mask": torch.from_numpy(padding_mask)}
