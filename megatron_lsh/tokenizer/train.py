"""Train a tokenizer from text: byte-level BPE (vocab.json + merges.txt) or SentencePiece.

BPE training uses the Hugging Face ``tokenizers`` trainer (fast, Rust); the files it writes
are read by our own :class:`~megatron_lsh.tokenizer.gpt2_bpe.GPT2BPETokenizer`. Outputs are
written under temporary names and renamed at the end, so a failed run leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence

from .base import TokenizerError

EOD_TOKEN = "<|endoftext|>"


def iter_jsonl_texts(paths: Sequence[str], json_keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Yield the ``json_keys`` strings of every line of the JSONL files (blank lines skipped)."""
    for path in paths:
        if not os.path.isfile(path):
            raise TokenizerError(f"input file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TokenizerError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(doc, dict):
                    raise TokenizerError(f"{path} line {line_no}: expected a JSON object")
                for key in json_keys:
                    if key not in doc:
                        raise TokenizerError(f"{path} line {line_no}: missing JSON key {key!r}")
                    if not isinstance(doc[key], str):
                        raise TokenizerError(f"{path} line {line_no}: JSON key {key!r} is not a string")
                    yield doc[key]


def _publish(tmp_dir: str, names: Sequence[str], out_dir: str) -> Dict[str, str]:
    paths = {}
    for name in names:
        final = os.path.join(out_dir, name)
        os.replace(os.path.join(tmp_dir, name), final)
        paths[name] = final
    return paths


class _Counted:
    """Iterates ``texts`` and counts the non-empty ones (an empty corpus must be an error)."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.non_empty = texts, 0

    def __iter__(self):
        for text in self.texts:
            if text and text.strip():
                self.non_empty += 1
            yield text


def train_bpe(texts: Iterable[str], vocab_size: int, output_dir: str, min_frequency: int = 2,
              log: Callable[[str], None] = print) -> Dict[str, str]:
    """Train a GPT-2 style byte-level BPE; write vocab.json, merges.txt and tokenizer.json.

    ``<|endoftext|>`` is the first vocabulary entry; all 256 byte symbols are included, so
    every text can be encoded. Returns the written paths by file name.
    """
    try:
        from tokenizers import ByteLevelBPETokenizer
    except ImportError:
        raise TokenizerError("training a BPE tokenizer needs the tokenizers package "
                             "(pip install tokenizers), or use --tokenizer-type SentencePieceTokenizer") from None
    if vocab_size < 257 + 1:
        raise TokenizerError(f"a byte-level BPE vocab_size must exceed 257 (256 bytes + eod), got {vocab_size}")
    start = time.time()
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    counted = _Counted(texts)
    tok.train_from_iterator(counted, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOD_TOKEN], show_progress=False)
    if counted.non_empty == 0:
        raise TokenizerError("no text to train the tokenizer on: the input holds no non-empty "
                             "text")
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-bpe-") as tmp:
        tok.save_model(tmp)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        paths = _publish(tmp, ["vocab.json", "merges.txt", "tokenizer.json"], output_dir)
    log(f"trained byte-level BPE: {tok.get_vocab_size()} tokens in {time.time() - start:.1f}s "
        f"-> {paths['vocab.json']}, {paths['merges.txt']}")
    return paths


class _Lines:
    """Non-empty lines of ``texts``; remembers an error of the input (SentencePiece hides it)."""

    def __init__(self, texts: Iterable[str]):
        self.texts = texts
        self.error: Optional[BaseException] = None
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self.texts:
                for line in text.splitlines():
                    if line.strip():
                        self.count += 1
                        yield line
        except BaseException as e:
            self.error = e
            raise


def train_sentencepiece(texts: Iterable[str], vocab_size: int, output_prefix: str,
                        model_type: str = "unigram", character_coverage: float = 1.0,
                        num_threads: int = 2, log: Callable[[str], None] = print) -> Dict[str, str]:
    """Train a SentencePiece model on the lines of ``texts``; write ``{prefix}.model``/``.vocab``.

    Ids: unk 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3. ``vocab_size`` is an upper bound on small
    corpora (``hard_vocab_limit`` off). Returns the written paths by suffix.
    """
    try:
        import sentencepiece as spm
    except ImportError:
        raise TokenizerError("training a SentencePiece model needs the sentencepiece package "
                             "(pip install sentencepiece)") from None
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise TokenizerError(f"SentencePiece model_type must be unigram, bpe, char or word, got {model_type!r}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    lines = _Lines(texts)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-spm-") as tmp:
        tmp_prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_prefix=tmp_prefix, vocab_size=vocab_size,
                model_type=model_type, character_coverage=character_coverage,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False,
                num_threads=num_threads, input_sentence_size=2_000_000,
                shuffle_input_sentence=True, minloglevel=2)
        except RuntimeError as e:
            if lines.error is not None:
                raise lines.error from None
            if lines.count == 0:
                raise TokenizerError("no text to train the tokenizer on: the input holds no "
                                     "non-empty text") from None
            raise TokenizerError(f"SentencePiece training failed: {str(e).strip().splitlines()[-1]}") from None
        paths = {}
        for suffix in (".model", ".vocab"):
            final = output_prefix + suffix
            os.replace(tmp_prefix + suffix, final)
            paths[suffix] = final
    log(f"trained SentencePiece ({model_type}) in {time.time() - start:.1f}s -> {paths['.model']}")
    return paths
