"""SentencePiece tokenizer from a ``.model`` file.

Roles reuse the pieces the model declares (its ``pad`` and ``eos`` ids, ``<s>``/``</s>``)
and conventional spellings when present; the rest are appended after the model's pieces.
"""
from __future__ import annotations

import os
from typing import List, Optional

from .base import AbstractTokenizer, TokenizerError


class SentencePieceTokenizer(AbstractTokenizer):
    """Wraps ``sentencepiece.SentencePieceProcessor``; special tokens appended when missing."""

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str, vocab_extra_ids: int = 0) -> None:
        super().__init__()
        try:
            import sentencepiece
        except ImportError:
            raise TokenizerError("SentencePieceTokenizer needs the sentencepiece package "
                                 "(pip install sentencepiece)") from None
        if not model_file:
            raise TokenizerError("SentencePieceTokenizer needs a model file (--tokenizer-model x.model)")
        if not os.path.isfile(model_file):
            raise TokenizerError(f"SentencePiece model {model_file} does not exist")
        self._model_file = model_file
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(model_file)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"SentencePiece model {model_file} could not be loaded ({e})") from None
        pad = self._sp.pad_id()
        eos = self._sp.eos_id()
        self._add_special_tokens(vocab_extra_ids, overrides={
            "pad": pad if pad >= 0 else None,
            "eod": eos if eos >= 0 else None,
        })

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_sp"] = None
        return state

    def __setstate__(self, state):
        import sentencepiece
        self.__dict__.update(state)
        self._sp = sentencepiece.SentencePieceProcessor()
        self._sp.Load(self._model_file)

    @property
    def base_vocab_size(self) -> int:
        """Number of pieces in the model."""
        return self._sp.GetPieceSize()

    def _lookup(self, token: str) -> Optional[int]:
        piece_id = self._sp.PieceToId(token)
        if 0 <= piece_id < self._sp.GetPieceSize() and self._sp.IdToPiece(piece_id) == token:
            return piece_id
        return None

    def _tokenize(self, text: str) -> List[int]:
        return list(self._sp.EncodeAsIds(text))

    def _detokenize(self, ids: List[int]) -> str:
        return self._sp.DecodeIds(ids)
