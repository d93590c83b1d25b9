"""Tokenizers behind one interface: GPT-2 byte-level BPE, SentencePiece, Hugging Face, Null.

``build_tokenizer`` picks one by Megatron's type names. Importing this package is cheap:
the implementations (and their optional libraries) load only when built.
"""
from __future__ import annotations

from typing import Optional

from .base import AbstractTokenizer, NullTokenizer, TokenizerError, sentinel_token

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "Llama2Tokenizer",
                   "HuggingFaceTokenizer", "BertWordPieceCase", "BertWordPieceLowerCase",
                   "NullTokenizer")

__all__ = ["AbstractTokenizer", "NullTokenizer", "TokenizerError", "TOKENIZER_TYPES",
           "build_tokenizer", "padded_vocab_size", "sentinel_token"]


def build_tokenizer(tokenizer_type: str, vocab_file: Optional[str] = None,
                    merge_file: Optional[str] = None, tokenizer_model: Optional[str] = None,
                    vocab_extra_ids: int = 0, vocab_size: Optional[int] = None,
                    **unused) -> AbstractTokenizer:
    """Build a tokenizer by Megatron type name.

    - ``GPT2BPETokenizer``: ``vocab_file`` (vocab.json) + ``merge_file`` (merges.txt).
    - ``SentencePieceTokenizer``, ``Llama2Tokenizer`` (the same: Llama 2 ships a SentencePiece
      model): ``tokenizer_model`` (a ``.model`` file).
    - ``BertWordPieceCase`` / ``BertWordPieceLowerCase``: ``vocab_file`` (BERT's vocab.txt);
      needs the ``tokenizers`` package.
    - ``HuggingFaceTokenizer``: ``tokenizer_model`` (tokenizer.json or its folder), or
      ``vocab_file`` + ``merge_file``; needs the ``tokenizers`` package.
    - ``NullTokenizer``: ``vocab_size``; text is whitespace-separated ids.

    ``vocab_extra_ids`` T5 sentinels are added after the base vocabulary (reused when present).
    Extra keyword arguments are ignored so a whole config can be passed.
    """
    if tokenizer_type == "GPT2BPETokenizer":
        from .gpt2_bpe import GPT2BPETokenizer
        return GPT2BPETokenizer(vocab_file, merge_file, vocab_extra_ids=vocab_extra_ids)
    if tokenizer_type in ("SentencePieceTokenizer", "Llama2Tokenizer"):
        from .sp_tokenizer import SentencePieceTokenizer
        return SentencePieceTokenizer(tokenizer_model, vocab_extra_ids=vocab_extra_ids)
    if tokenizer_type == "HuggingFaceTokenizer":
        from .hf_tokenizer import HuggingFaceTokenizer
        return HuggingFaceTokenizer(tokenizer_model, vocab_file, merge_file,
                                    vocab_extra_ids=vocab_extra_ids)
    if tokenizer_type in ("BertWordPieceCase", "BertWordPieceLowerCase"):
        from .wordpiece import BertWordPieceTokenizer
        return BertWordPieceTokenizer(vocab_file, tokenizer_type.endswith("LowerCase"),
                                      vocab_extra_ids=vocab_extra_ids)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size, vocab_extra_ids=vocab_extra_ids)
    raise TokenizerError(f"tokenizer type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}")


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                      tensor_model_parallel_size: int = 1) -> int:
    """Round ``vocab_size`` up to a multiple of ``divisible_by * tp`` (Megatron's embedding padding)."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple
