"""A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``, or a vocab.json + merges.txt pair).

Optional: needs the ``tokenizers`` package. Text is encoded without the post-processor's
special tokens; roles reuse the tokenizer's own special tokens when it has them. Unlike the
other tokenizers, the library matches the special tokens a ``tokenizer.json`` declares
(e.g. ``<|endoftext|>``) when they appear inside text.
"""
from __future__ import annotations

import os
from typing import List, Optional

from .base import AbstractTokenizer, TokenizerError


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("HuggingFaceTokenizer needs the tokenizers package "
                             "(pip install tokenizers)") from None
    return tokenizers


class HuggingFaceTokenizer(AbstractTokenizer):
    """``tokenizers.Tokenizer`` behind the common interface."""

    name = "HuggingFaceTokenizer"

    def __init__(self, tokenizer_model: Optional[str] = None, vocab_file: Optional[str] = None,
                 merge_file: Optional[str] = None, vocab_extra_ids: int = 0) -> None:
        super().__init__()
        self._source = (tokenizer_model, vocab_file, merge_file)
        self._tok = self._load(*self._source)
        self._add_special_tokens(vocab_extra_ids)

    @staticmethod
    def _load(tokenizer_model, vocab_file, merge_file):
        tokenizers = _import_tokenizers()
        if tokenizer_model:
            path = tokenizer_model
            if os.path.isdir(path):
                path = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(path):
                raise TokenizerError(f"Hugging Face tokenizer file {path} does not exist")
            try:
                return tokenizers.Tokenizer.from_file(path)
            except Exception as e:  # the library raises a bare Exception on bad JSON
                raise TokenizerError(f"Hugging Face tokenizer {path} could not be loaded ({e})") from None
        if vocab_file and merge_file:
            for p in (vocab_file, merge_file):
                if not os.path.isfile(p):
                    raise TokenizerError(f"tokenizer file {p} does not exist")
            model = tokenizers.models.BPE.from_file(vocab_file, merge_file)
            tok = tokenizers.Tokenizer(model)
            tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = tokenizers.decoders.ByteLevel()
            return tok
        raise TokenizerError("HuggingFaceTokenizer needs --tokenizer-model (tokenizer.json or its "
                             "folder) or --vocab-file with --merge-file")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tok"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tok = self._load(*self._source)

    @property
    def base_vocab_size(self) -> int:
        """Vocabulary of the tokenizer, its own added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _lookup(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def _tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _detokenize(self, ids: List[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)
