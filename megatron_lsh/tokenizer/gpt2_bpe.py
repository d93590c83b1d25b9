"""GPT-2 byte-level BPE from a ``vocab.json`` + ``merges.txt`` pair (our own implementation).

Encoding, step by step:

1. Pre-tokenize ``text`` with GPT-2's regular expression (contractions, letter runs, digit
   runs, punctuation runs, whitespace), each piece optionally led by one space.
2. Map each piece's UTF-8 bytes to printable characters (the byte-to-unicode table below),
   so every byte string is a string over a 256-symbol alphabet.
3. Apply the merges: repeatedly join the adjacent pair with the lowest merge rank until no
   adjacent pair has a rank. Merge order only depends on the piece, so results are cached.
4. Look the resulting symbols up in ``vocab.json``.

Decoding maps ids back to symbols, symbols back to bytes, bytes to UTF-8 text.
The ids agree with the Hugging Face ``tokenizers`` ByteLevel BPE on the same files.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

from .base import AbstractTokenizer, TokenizerError

# GPT-2's pre-tokenisation pattern (needs the `regex` package for \p{L} / \p{N}).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_CACHE_LIMIT = 200_000


def byte_to_unicode_table() -> Dict[int, str]:
    """Byte value -> printable character used to spell it inside BPE symbols.

    Bytes that are already visible Latin-1 characters keep their own character; the others
    (control characters, space, a few Latin-1 gaps) are assigned code points from 256 up, in
    byte order. This is the table GPT-2's files are written in.
    """
    visible = set(range(ord("!"), ord("~") + 1))
    visible |= set(range(ord("\u00a1"), ord("\u00ac") + 1))
    visible |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
    table: Dict[int, str] = {}
    next_code = 256
    for byte in range(256):
        if byte in visible:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(next_code)
            next_code += 1
    return table


def _load_vocab(path: str) -> Dict[str, int]:
    if not path:
        raise TokenizerError("GPT2BPETokenizer needs a vocab file (--vocab-file vocab.json)")
    if not os.path.isfile(path):
        raise TokenizerError(f"vocab file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"vocab file {path} is not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"vocab file {path} must be a JSON object of token -> integer id")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise TokenizerError(f"vocab file {path} must number its tokens 0..{len(ids) - 1} without gaps")
    return vocab


def _load_merges(path: str) -> Dict[Tuple[str, str], int]:
    if not path:
        raise TokenizerError("GPT2BPETokenizer needs a merges file (--merge-file merges.txt)")
    if not os.path.isfile(path):
        raise TokenizerError(f"merges file {path} does not exist")
    ranks: Dict[Tuple[str, str], int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line or (line_no == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(
                    f"merges file {path} line {line_no}: expected two symbols, got {line[:60]!r}")
            ranks.setdefault((parts[0], parts[1]), len(ranks))
    return ranks


class GPT2BPETokenizer(AbstractTokenizer):
    """Byte-level BPE with GPT-2's pre-tokenizer; special tokens appended after the vocab."""

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str, vocab_extra_ids: int = 0) -> None:
        super().__init__()
        import regex  # a hard dependency of the package, imported late to keep imports light

        self._encoder = _load_vocab(vocab_file)
        self._decoder = {i: s for s, i in self._encoder.items()}
        self._ranks = _load_merges(merge_file)
        self._byte_to_char = byte_to_unicode_table()
        self._char_to_byte = {c: b for b, c in self._byte_to_char.items()}
        self._pattern = regex.compile(GPT2_PATTERN)
        self._cache: Dict[str, Tuple[int, ...]] = {}
        self._add_special_tokens(vocab_extra_ids)

    @property
    def base_vocab_size(self) -> int:
        """Entries of ``vocab.json``."""
        return len(self._encoder)

    def _lookup(self, token: str) -> Optional[int]:
        return self._encoder.get(token)

    def _merge(self, symbols: List[str]) -> List[str]:
        """Apply merges to one pre-tokenized piece, lowest rank first, all occurrences at once."""
        ranks = self._ranks
        while len(symbols) > 1:
            best_rank, best = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged: List[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _piece_ids(self, piece: str) -> Tuple[int, ...]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        spelled = "".join(self._byte_to_char[b] for b in piece.encode("utf-8"))
        try:
            ids = tuple(self._encoder[s] for s in self._merge(list(spelled)))
        except KeyError as e:
            raise TokenizerError(
                f"symbol {e.args[0]!r} is missing from the vocab file; it must contain all 256 "
                "byte symbols") from None
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def _tokenize(self, text: str) -> List[int]:
        ids: List[int] = []
        for piece in self._pattern.findall(text):
            ids.extend(self._piece_ids(piece))
        return ids

    def _detokenize(self, ids: List[int]) -> str:
        spelled = "".join(self._decoder[i] for i in ids)
        data = bytes(self._char_to_byte[c] for c in spelled)
        return data.decode("utf-8", errors="replace")
