"""The interface every tokenizer offers, and how special tokens are found or added.

A tokenizer has a *base* vocabulary (what its files define) and, after it, the special tokens
it had to add because the base vocabulary lacks them. Roles and how they are resolved:

- ``eod`` (end of document), ``pad``, ``mask``, ``cls``, ``sep``: each role first looks for one
  of a few conventional spellings in the base vocabulary (``<|endoftext|>``, ``</s>``,
  ``[MASK]``...); when none exists, a new token (``<eod>``, ``<pad>``, ``<mask>``, ``<cls>``,
  ``<sep>``) is appended after the base vocabulary.
- T5 sentinels ``<extra_id_0>`` .. ``<extra_id_{N-1}>`` (``vocab_extra_ids = N``): reused when
  present, appended otherwise. Their ids are ``additional_special_tokens_ids``.

Two roles may share one id (e.g. ``sep`` and ``eod`` are both ``</s>`` in a SentencePiece
model). Text is never scanned for special-token spellings: a document that contains the
characters ``<|endoftext|>`` is tokenized as ordinary text.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, Iterable, List, Optional, Sequence

ROLES = ("eod", "pad", "mask", "cls", "sep")

# Spellings looked up in the base vocabulary, in order, before a role's token is added.
ROLE_CANDIDATES: Dict[str, Sequence[str]] = {
    "eod": ("<|endoftext|>", "</s>", "<eod>", "<eos>", "[EOS]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "mask": ("<mask>", "[MASK]"),
    "cls": ("<cls>", "[CLS]", "<s>"),
    "sep": ("<sep>", "[SEP]", "</s>"),
}

# The token appended when a role has no candidate in the base vocabulary.
ROLE_NEW_TOKEN: Dict[str, str] = {
    "eod": "<eod>", "pad": "<pad>", "mask": "<mask>", "cls": "<cls>", "sep": "<sep>",
}


class TokenizerError(ValueError):
    """Bad tokenizer input (missing file, unknown type, id out of range); one sentence."""


def sentinel_token(i: int) -> str:
    """The spelling of the i-th T5 sentinel token."""
    return f"<extra_id_{i}>"


class AbstractTokenizer(ABC):
    """Common interface: ``vocab_size``, ``tokenize``, ``detokenize`` and special-token ids.

    Subclasses implement the base vocabulary (``base_vocab_size``, ``_lookup``,
    ``_tokenize``, ``_detokenize``) and call :meth:`_add_special_tokens` once at the end of
    their constructor.
    """

    name = "abstract"

    def __init__(self) -> None:
        self._added: Dict[str, int] = {}
        self._added_by_id: Dict[int, str] = {}
        self._roles: Dict[str, int] = {}
        self._sentinels: List[int] = []

    # --- base vocabulary (subclasses) -----------------------------------------------------

    @property
    @abstractmethod
    def base_vocab_size(self) -> int:
        """Size of the vocabulary defined by the tokenizer's files (before added tokens)."""

    @abstractmethod
    def _lookup(self, token: str) -> Optional[int]:
        """The base-vocabulary id of ``token`` (a whole token spelling), or None."""

    @abstractmethod
    def _tokenize(self, text: str) -> List[int]:
        """Base-vocabulary ids of ``text``."""

    @abstractmethod
    def _detokenize(self, ids: List[int]) -> str:
        """Text of a run of base-vocabulary ids."""

    # --- special tokens -------------------------------------------------------------------

    def _add_token(self, token: str) -> int:
        if token not in self._added:
            new_id = self.base_vocab_size + len(self._added)
            self._added[token] = new_id
            self._added_by_id[new_id] = token
        return self._added[token]

    def _resolve(self, candidates: Iterable[str], new_token: str) -> int:
        for spelling in candidates:
            found = self._lookup(spelling)
            if found is not None:
                return found
        return self._add_token(new_token)

    def _add_special_tokens(self, vocab_extra_ids: int = 0,
                            overrides: Optional[Dict[str, Optional[int]]] = None) -> None:
        """Find or add every role's token and ``vocab_extra_ids`` sentinels (in that order).

        ``overrides`` maps a role to a base id the subclass knows better (e.g. the pad id a
        SentencePiece model declares); None entries are ignored.
        """
        if vocab_extra_ids < 0:
            raise TokenizerError(f"vocab_extra_ids must be non-negative, got {vocab_extra_ids}")
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        for role in ROLES:
            if role in overrides:
                self._roles[role] = overrides[role]
            else:
                self._roles[role] = self._resolve(ROLE_CANDIDATES[role], ROLE_NEW_TOKEN[role])
        self._sentinels = [self._resolve((sentinel_token(i),), sentinel_token(i))
                           for i in range(vocab_extra_ids)]

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus the special tokens added after it."""
        return self.base_vocab_size + len(self._added)

    @property
    def eod(self) -> int:
        """End-of-document id (appended by ``preprocess_data.py --append-eod``)."""
        return self._roles["eod"]

    @property
    def pad(self) -> int:
        """Padding id."""
        return self._roles["pad"]

    @property
    def mask(self) -> int:
        """MLM mask id."""
        return self._roles["mask"]

    @property
    def cls(self) -> int:
        """Classification / start-of-sequence id (also the T5 decoder start)."""
        return self._roles["cls"]

    @property
    def sep(self) -> int:
        """Separator / end-of-sequence id."""
        return self._roles["sep"]

    @property
    def additional_special_tokens_ids(self) -> List[int]:
        """Ids of the T5 sentinels ``<extra_id_0>``.. in order."""
        return list(self._sentinels)

    @property
    def special_token_ids(self) -> Dict[str, int]:
        """Role name -> id for eod, pad, mask, cls, sep."""
        return dict(self._roles)

    @property
    def added_tokens(self) -> Dict[str, int]:
        """Tokens appended after the base vocabulary, spelling -> id."""
        return dict(self._added)

    # --- text <-> ids ---------------------------------------------------------------------

    def tokenize(self, text: str) -> List[int]:
        """Token ids of ``text`` (no special tokens are added or recognised)."""
        return self._tokenize(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; added special tokens are written as their spelling."""
        pieces: List[str] = []
        run: List[int] = []
        base, total = self.base_vocab_size, self.vocab_size
        for raw in ids:
            token_id = int(raw)
            if 0 <= token_id < base:
                run.append(token_id)
                continue
            if token_id not in self._added_by_id:
                raise TokenizerError(
                    f"token id {token_id} is outside the {self.name} vocabulary of size {total}")
            if run:
                pieces.append(self._detokenize(run))
                run = []
            pieces.append(self._added_by_id[token_id])
        if run:
            pieces.append(self._detokenize(run))
        return "".join(pieces)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, "
                f"added={len(self._added)}, sentinels={len(self._sentinels)})")


class NullTokenizer(AbstractTokenizer):
    """Text is whitespace-separated integer ids below ``vocab_size`` (tests, pre-tokenized data)."""

    name = "NullTokenizer"

    def __init__(self, vocab_size: int, vocab_extra_ids: int = 0) -> None:
        super().__init__()
        if vocab_size is None or vocab_size <= 0:
            raise TokenizerError(f"NullTokenizer needs a positive vocab_size, got {vocab_size}")
        self._size = int(vocab_size)
        self._add_special_tokens(vocab_extra_ids)

    @property
    def base_vocab_size(self) -> int:
        """The ``vocab_size`` given."""
        return self._size

    def _lookup(self, token: str) -> Optional[int]:
        return None

    def _tokenize(self, text: str) -> List[int]:
        ids = []
        for word in text.split():
            try:
                value = int(word)
            except ValueError:
                raise TokenizerError(f"NullTokenizer expects integer ids, got {word[:40]!r}") from None
            ids.append(value)
        return ids

    def _detokenize(self, ids: List[int]) -> str:
        return " ".join(str(i) for i in ids)
