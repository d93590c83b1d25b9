"""Helpers for end-to-end tests: synthetic corpora and torchrun launches of the entry points."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VOCAB = 512


def write_synthetic_corpus(prefix: str, num_docs: int = 120, seed: int = 0) -> str:
    """A document-level and a sentence-level dataset of token ids below VOCAB.

    Documents are made of 'sentences' drawn from a few repeating patterns, so models can learn
    something; returns ``prefix`` (``{prefix}_document`` and ``{prefix}_sentence`` exist).
    """
    from megatron_lsh.data.indexed import write_dataset

    rng = np.random.default_rng(seed)
    patterns = [rng.integers(0, VOCAB, size=rng.integers(6, 20)) for _ in range(40)]
    docs = []
    for _ in range(num_docs):
        sentences = [patterns[i] for i in rng.integers(0, len(patterns), size=rng.integers(4, 12))]
        docs.append([list(map(int, s)) for s in sentences])
    write_dataset(prefix + "_sentence", docs)
    write_dataset(prefix + "_document", [[t for s in d for t in s] for d in docs])
    return prefix


def tiny_run_args(kind: str, data_prefix: str, workdir: str, *, iters: int = 20) -> list[str]:
    """Flags of a tiny, quick run of ``kind`` on the synthetic corpus."""
    level = "document" if kind == "gpt" else "sentence"
    args = ["--model-recipe", f"tiny-{kind}-moe", "--seq-length", "32",
            "--max-position-embeddings", "32", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(VOCAB), "--data-path", f"{data_prefix}_{level}",
            "--split", "90,10,0", "--data-cache-path", os.path.join(workdir, "index-cache"),
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(iters),
            "--lr", "1e-3", "--lr-warmup-iters", "2", "--eval-interval", "10", "--eval-iters", "1",
            "--log-interval", "5", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
            "--moe-a2a-compression", "lsh", "--distributed-backend", "gloo"]
    if kind == "t5":
        args += ["--vocab-extra-ids", "10", "--decoder-seq-length", "16"]
    return args


def run_entry(kind: str, args: list[str], nproc: int, timeout: float = 300,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run ``pretrain_{kind}_moe.py`` under torchrun (or python for one process)."""
    return run_script(f"pretrain_{kind}_moe.py", args, nproc, timeout, check)


def run_script(name: str, args: list[str], nproc: int, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run the entry point ``name`` of the repository under torchrun (python for one
    process); with ``check`` a failure raises with the end of its output."""
    script = str(REPO / name)
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def read_metrics(path: str, kind: str = "iteration") -> list[dict]:
    """The iteration (or ``kind='validation'``) records of a --metrics-jsonl file."""
    from megatron_lsh.training.logger import read_metrics as read
    return read(path, kind)


def write_glue_task(folder: str, task: str, n_train: int = 256, n_dev: int = 64,
                    n_test: int = 32, seed: int = 0) -> str:
    """A learnable GLUE task in GLUE's own file format, in NullTokenizer text (ids < VOCAB).

    SST-2: random ids 10..59 with one keyword id inserted, 3 for label 1 and 4 for label 0.
    MNLI: a random premise, a hypothesis holding keyword 3 / 4 / 5 for contradiction /
    entailment / neutral (files dev_matched, dev_mismatched, test_matched, test_mismatched).
    STS-B: the score is the number of keyword-3 ids in both sentences (0..5).
    """
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)

    def words(n_keywords: int = 0, keyword: int = 3) -> list:
        ids = [str(x) for x in rng.integers(10, 60, size=rng.integers(4, 12))]
        for _ in range(n_keywords):
            ids.insert(int(rng.integers(0, len(ids) + 1)), str(keyword))
        return ids

    def rows(n: int, test: bool):
        for i in range(n):
            if task == "SST-2":
                label = int(rng.integers(0, 2))
                text = " ".join(words(1, 3 if label else 4))
                yield [str(i), text] if test else [text, str(label)]
            elif task == "MNLI":
                label = int(rng.integers(0, 3))
                premise, hypothesis = " ".join(words()), " ".join(words(1, 3 + label))
                gold = ("contradiction", "entailment", "neutral")[label]
                yield ([str(i), premise, hypothesis] if test else
                       [str(i), premise, hypothesis, gold])
            else:   # STS-B
                a, b = int(rng.integers(0, 3)), int(rng.integers(0, 3))
                s1, s2 = " ".join(words(a)), " ".join(words(b))
                yield [str(i), s1, s2] if test else [str(i), s1, s2, f"{min(5, a + b):.1f}"]

    headers = {"SST-2": (["sentence", "label"], ["index", "sentence"]),
               "MNLI": (["index", "sentence1", "sentence2", "gold_label"],
                        ["index", "sentence1", "sentence2"]),
               "STS-B": (["index", "sentence1", "sentence2", "score"],
                         ["index", "sentence1", "sentence2"])}[task]
    dev = ("dev_matched", "dev_mismatched") if task == "MNLI" else ("dev",)
    test = ("test_matched", "test_mismatched") if task == "MNLI" else ("test",)
    for split, n, is_test in ([("train", n_train, False)] + [(d, n_dev, False) for d in dev]
                              + [(t, n_test, True) for t in test]):
        with open(os.path.join(folder, f"{split}.tsv"), "w") as f:
            f.write("\t".join(headers[1] if is_test else headers[0]) + "\n")
            for row in rows(n, is_test):
                f.write("\t".join(row) + "\n")
    return folder
