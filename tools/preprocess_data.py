#!/usr/bin/env python
"""Tokenize a JSONL corpus into Megatron ``.bin``/``.idx`` datasets (one per JSON key).

    python tools/preprocess_data.py --input train.jsonl --output-prefix data/shakespeare \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 2

writes ``data/shakespeare_text_document.bin/.idx`` (``_sentence`` with --split-sentences).
Streams: memory does not grow with the corpus. Outputs appear only when the run succeeds.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_lsh.data.errors import DataError  # noqa: E402
from megatron_lsh.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_lsh.tokenizer import TOKENIZER_TYPES, TokenizerError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Megatron's preprocess_data.py flags (plus --skip-bad-lines)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="JSONL file, one document per line")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (default: text)")
    g.add_argument("--split-sentences", action="store_true", help="one sequence per sentence")
    g.add_argument("--keep-newlines", action="store_true",
                   help="accepted for compatibility: the sentence splitter always keeps newlines")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed lines instead of stopping at the first")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", help="vocab.json (GPT2BPETokenizer, HuggingFaceTokenizer)")
    g.add_argument("--merge-file", help="merges.txt (GPT2BPETokenizer, HuggingFaceTokenizer)")
    g.add_argument("--tokenizer-model", help=".model (SentencePiece) or tokenizer.json (Hugging Face)")
    g.add_argument("--vocab-size", type=int, help="vocabulary size (NullTokenizer)")
    g.add_argument("--vocab-extra-ids", type=int, default=0, help="T5 sentinel tokens to add")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_{document|sentence}.bin/.idx")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="only mmap (MMIDIDX)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (1: in the main process)")
    g.add_argument("--partitions", type=int, default=1, help="split the input into N parts processed in parallel")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Entry point; returns the exit status (2 on bad input)."""
    args = parse_args(argv)
    try:
        config = PreprocessConfig(
            input=args.input, output_prefix=args.output_prefix, json_keys=args.json_keys,
            tokenizer=dict(tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
                           merge_file=args.merge_file, tokenizer_model=args.tokenizer_model,
                           vocab_size=args.vocab_size, vocab_extra_ids=args.vocab_extra_ids),
            append_eod=args.append_eod, split_sentences=args.split_sentences, workers=args.workers,
            partitions=args.partitions, log_interval=args.log_interval,
            skip_bad_lines=args.skip_bad_lines)
        preprocess(config, log=lambda m: print(m, flush=True))
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
