#!/usr/bin/env python
"""Train a tokenizer on JSONL text: GPT-2 byte-level BPE or SentencePiece.

    python tools/train_tokenizer.py --input data/shakespeare/train.jsonl \\
        --tokenizer-type GPT2BPETokenizer --vocab-size 8000 --output-dir data/tokenizer
    # -> vocab.json, merges.txt, tokenizer.json

    python tools/train_tokenizer.py --input data/shakespeare/train.jsonl \\
        --tokenizer-type SentencePieceTokenizer --vocab-size 8000 --output-dir data/tokenizer
    # -> spm.model, spm.vocab

Train on the training split only, so validation text stays unseen.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_lsh.tokenizer import TokenizerError  # noqa: E402
from megatron_lsh.tokenizer.train import iter_jsonl_texts, train_bpe, train_sentencepiece  # noqa: E402


def main(argv=None) -> int:
    """Entry point; returns the exit status (2 on bad input)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL file(s)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding the text (default: text)")
    p.add_argument("--tokenizer-type", default="GPT2BPETokenizer",
                   choices=["GPT2BPETokenizer", "SentencePieceTokenizer"])
    p.add_argument("--vocab-size", type=int, default=8000, help="target vocabulary size (default 8000)")
    p.add_argument("--output-dir", required=True, help="folder for the tokenizer files")
    p.add_argument("--min-frequency", type=int, default=2, help="BPE: least count of a merged pair")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"],
                   help="SentencePiece model type (default unigram)")
    p.add_argument("--model-name", default="spm", help="SentencePiece file name stem (default spm)")
    args = p.parse_args(argv)
    try:
        if args.vocab_size <= 0:
            raise TokenizerError(f"--vocab-size must be positive, got {args.vocab_size}")
        texts = iter_jsonl_texts(args.input, args.json_keys)
        log = lambda m: print(m, flush=True)  # noqa: E731
        print(f"training {args.tokenizer_type} (vocab {args.vocab_size}) on {', '.join(args.input)}", flush=True)
        if args.tokenizer_type == "GPT2BPETokenizer":
            paths = train_bpe(texts, args.vocab_size, args.output_dir, args.min_frequency, log=log)
            print(f"use: --tokenizer-type GPT2BPETokenizer --vocab-file {paths['vocab.json']} "
                  f"--merge-file {paths['merges.txt']}")
        else:
            prefix = os.path.join(args.output_dir, args.model_name)
            paths = train_sentencepiece(texts, args.vocab_size, prefix, args.model_type, log=log)
            print(f"use: --tokenizer-type SentencePieceTokenizer --tokenizer-model {paths['.model']}")
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
