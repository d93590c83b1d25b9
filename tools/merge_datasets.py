#!/usr/bin/env python
"""Merge several ``.bin``/``.idx`` datasets (same dtype) into one, in the order given.

    python tools/merge_datasets.py --input data/part_a data/part_b --output-prefix data/all
    python tools/merge_datasets.py --input data/parts/ --output-prefix data/all   # every prefix in a folder

Streams (constant memory); the output appears only when the merge succeeded.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_lsh.data.errors import DataError  # noqa: E402
from megatron_lsh.data.indexed import merge_datasets  # noqa: E402


def expand_inputs(inputs):
    """Prefixes from the arguments: a folder stands for every ``*.idx`` prefix in it, sorted."""
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n[:-4]) for n in os.listdir(item) if n.endswith(".idx"))
            if not found:
                raise DataError(f"input folder {item} holds no .idx files")
            prefixes.extend(found)
        else:
            prefixes.append(item[:-4] if item.endswith((".idx", ".bin")) else item)
    return prefixes


def main(argv=None) -> int:
    """Entry point; returns the exit status (2 on bad input)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes or folders of them")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}.bin/.idx")
    args = p.parse_args(argv)
    try:
        prefixes = expand_inputs(args.input)
        out = os.path.abspath(args.output_prefix)
        if any(os.path.abspath(x) == out for x in prefixes):
            raise DataError(f"output prefix {args.output_prefix} is also an input")
        for prefix in prefixes:
            print(f"merging {prefix}", flush=True)
        merged = merge_datasets(prefixes, args.output_prefix)
        print(f"wrote {args.output_prefix}.bin/.idx: {merged.num_documents} documents, "
              f"{len(merged)} sequences, {merged.num_tokens} tokens ({merged.dtype})")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
