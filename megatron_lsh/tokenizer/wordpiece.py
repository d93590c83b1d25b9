"""BERT's WordPiece tokenizers (Megatron's ``BertWordPieceCase`` / ``BertWordPieceLowerCase``).

A ``vocab.txt`` (one token per line, as BERT distributes it) read by the ``tokenizers``
package's WordPiece model with BERT's normaliser and pre-tokeniser; ``LowerCase`` lowercases
and strips accents first, ``Case`` keeps the text as is. The roles reuse BERT's own
``[CLS]``, ``[SEP]``, ``[MASK]``, ``[PAD]`` tokens.
"""
from __future__ import annotations

import os

from .base import TokenizerError
from .hf_tokenizer import HuggingFaceTokenizer, _import_tokenizers


class BertWordPieceTokenizer(HuggingFaceTokenizer):
    """WordPiece over a BERT ``vocab.txt``; ``lower_case`` selects the LowerCase variant."""

    def __init__(self, vocab_file: str, lower_case: bool, vocab_extra_ids: int = 0) -> None:
        self.name = "BertWordPieceLowerCase" if lower_case else "BertWordPieceCase"
        self._lower_case = lower_case
        super().__init__(None, vocab_file, None, vocab_extra_ids=vocab_extra_ids)

    def _load(self, tokenizer_model, vocab_file, merge_file):
        tokenizers = _import_tokenizers()
        if not vocab_file:
            raise TokenizerError(f"{self.name} needs --vocab-file (BERT's vocab.txt)")
        if not os.path.isfile(vocab_file):
            raise TokenizerError(f"tokenizer file {vocab_file} does not exist")
        try:
            wrapper = tokenizers.BertWordPieceTokenizer(vocab_file, lowercase=self._lower_case,
                                                        strip_accents=self._lower_case)
        except Exception as e:  # the library raises bare Exceptions on bad files
            raise TokenizerError(f"{self.name} could not read {vocab_file} ({e})") from None
        return wrapper._tokenizer
