"""T5 span-corruption dataset (noise density 0.15, mean span length 3, sentinel tokens).

For a sample whose content has L tokens (whole sentences, as for MLM):

1. ``noise = round(L * noise_density)`` tokens (at least 1, at most L - 1) are corrupted, in
   ``spans = round(noise / mean_span_length)`` spans (at least 1);
2. the noise tokens and the kept tokens are each cut into ``spans`` random non-empty
   segments, interleaved kept, noise, kept, noise, ... (T5's ``random_spans_noise_mask``);
3. the encoder input is the kept tokens with span k replaced by sentinel ``<extra_id_k>``;
   the target is ``<extra_id_0> span_0 <extra_id_1> span_1 ...`` followed by ``eod``;
   the decoder input is ``cls`` followed by the target without its last token.

Item i: ``encoder_tokens`` (seq_length), ``decoder_tokens``, ``labels`` (decoder_seq_length,
int64, padded with ``pad``), ``loss_mask`` (float32), ``encoder_padding_mask``,
``decoder_padding_mask`` (int64, 1 for real tokens).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .errors import DataError
from .indexed import IndexedDataset
from .sentence_samples import SentenceSpanSamples
from .special_tokens import SpecialTokenIds


def noise_span_counts(length: int, noise_density: float, mean_span_length: float) -> Tuple[int, int]:
    """(noise tokens, noise spans) for content of ``length`` tokens."""
    if length < 2:
        return 0, 0
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = min(max(int(round(noise / mean_span_length)), 1), noise, length - noise)
    return noise, spans


def _segments(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` cut into ``parts`` random positive lengths."""
    if parts == 1:
        return np.asarray([total], dtype=np.int64)
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def noise_spans(length: int, noise_density: float, mean_span_length: float,
                rng: np.random.Generator) -> List[Tuple[int, int]]:
    """The corrupted ``[start, end)`` spans of a sequence of ``length`` tokens, in order."""
    noise, spans = noise_span_counts(length, noise_density, mean_span_length)
    if spans == 0:
        return []
    noise_lengths = _segments(noise, spans, rng)
    kept_lengths = _segments(length - noise, spans, rng)
    out, pos = [], 0
    for kept, corrupted in zip(kept_lengths, noise_lengths):
        pos += int(kept)
        out.append((pos, pos + int(corrupted)))
        pos += int(corrupted)
    return out


class T5Dataset(SentenceSpanSamples):
    """Span-corruption samples over documents ``[first, end)`` of a (sentence-level) dataset.

    Args:
        indexed, document_range, num_samples, seed: as for :class:`GPTDataset`.
        seq_length: encoder length (and the content budget of a sample).
        special: :class:`SpecialTokenIds` with enough sentinels (``vocab_extra_ids``).
        decoder_seq_length: decoder length; must hold the longest target.
        noise_density, mean_span_length: corruption settings (0.15, 3.0).
        short_seq_prob, cross_documents, name, cache_dir, group, log: see
            :class:`SentenceSpanSamples`.
    """

    kind = "t5"
    needs_special_tokens = True  # cls / sep / mask / sentinel ids come from the tokenizer

    def __init__(self, indexed: Union[str, IndexedDataset], document_range: Optional[Tuple[int, int]],
                 num_samples: Optional[int], seq_length: int, seed: int, special: SpecialTokenIds, *,
                 decoder_seq_length: int = 128, noise_density: float = 0.15,
                 mean_span_length: float = 3.0, short_seq_prob: float = 0.0,
                 cross_documents: bool = True, name: str = "train",
                 cache_dir: Optional[str] = None, group=None, log=None):
        if not 0.0 < noise_density < 1.0:
            raise DataError(f"noise_density must be in (0, 1), got {noise_density}")
        if mean_span_length < 1.0:
            raise DataError(f"mean_span_length must be at least 1, got {mean_span_length}")
        self.seq_length = int(seq_length)
        self.decoder_seq_length = int(decoder_seq_length)
        self.special = special
        self.noise_density = float(noise_density)
        self.mean_span_length = float(mean_span_length)
        noise, spans = noise_span_counts(self.seq_length, noise_density, mean_span_length)
        if spans > len(special.sentinels):
            raise DataError(f"T5 samples of {self.seq_length} tokens need {spans} sentinel tokens "
                            f"(noise density {noise_density}, mean span {mean_span_length}) but the "
                            f"tokenizer has {len(special.sentinels)}: build it with vocab_extra_ids >= {spans}")
        if noise + spans + 1 > self.decoder_seq_length:
            raise DataError(f"decoder_seq_length {self.decoder_seq_length} is too short for encoder "
                            f"length {self.seq_length} at noise density {noise_density}: targets need "
                            f"up to {noise + spans + 1} tokens")
        super().__init__(indexed, document_range, num_samples, self.seq_length, seed, special.sep,
                         name=name, short_seq_prob=short_seq_prob, cross_documents=cross_documents,
                         cache_dir=cache_dir, group=group, log=log)

    def corrupted_sample(self, idx: int) -> Dict[str, np.ndarray]:
        """Unpadded encoder input, decoder input and labels of sample ``idx`` (int64)."""
        content = self.content(idx)
        spans = noise_spans(len(content), self.noise_density, self.mean_span_length, self.sample_rng(idx))
        sentinels = self.special.sentinels
        encoder, target, prev = [], [], 0
        for k, (start, end) in enumerate(spans):
            encoder.append(content[prev:start])
            encoder.append(np.asarray([sentinels[k]], dtype=np.int64))
            target.append(np.asarray([sentinels[k]], dtype=np.int64))
            target.append(content[start:end])
            prev = end
        encoder.append(content[prev:])
        target = np.concatenate(target) if target else np.zeros(0, dtype=np.int64)
        labels = np.concatenate([target, [self.special.eod]]).astype(np.int64)
        decoder = np.concatenate([[self.special.cls], target]).astype(np.int64)
        return {"encoder_tokens": np.concatenate(encoder).astype(np.int64),
                "decoder_tokens": decoder, "labels": labels}

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        sample = self.corrupted_sample(int(idx))
        pad = self.special.pad

        def padded(x: np.ndarray, n: int) -> torch.Tensor:
            return torch.from_numpy(np.pad(x, (0, n - len(x)), constant_values=pad))

        def real(count: int, n: int) -> torch.Tensor:
            mask = torch.zeros(n, dtype=torch.int64)
            mask[:count] = 1
            return mask

        n_enc, n_dec = len(sample["encoder_tokens"]), len(sample["labels"])
        return {
            "encoder_tokens": padded(sample["encoder_tokens"], self.seq_length),
            "decoder_tokens": padded(sample["decoder_tokens"], self.decoder_seq_length),
            "labels": padded(sample["labels"], self.decoder_seq_length),
            "loss_mask": real(n_dec, self.decoder_seq_length).to(torch.float32),
            "encoder_padding_mask": real(n_enc, self.seq_length),
            "decoder_padding_mask": real(n_dec, self.decoder_seq_length),
        }
