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
    script = str(REPO / f"pretrain_{kind}_moe.py")
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{kind} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def read_metrics(path: str, kind: str = "iteration") -> list[dict]:
    """The iteration (or ``kind='validation'``) records of a --metrics-jsonl file."""
    from megatron_lsh.training.logger import read_metrics as read
    return read(path, kind)
