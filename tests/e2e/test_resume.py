"""Exact resume: N iterations straight equal N/2 + save + resume + N/2, bit for bit.

Tiny MoE models with the LSH all-to-all and dropout on, launched with torchrun on 4 gloo
processes; the per-iteration ``lm_loss`` values of ``--metrics-jsonl`` must be identical.
"""
import os

import pytest

from tests.e2e.util import read_metrics, run_entry, tiny_run_args, write_synthetic_corpus

CASES = [
    ("gpt", ["--expert-model-parallel-size", "4"], "ep4"),
    ("gpt", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
             "--expert-model-parallel-size", "2"], "tp2-pp2-ep2"),
    ("roberta", ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2"],
     "tp2-ep2-dp2"),
    ("t5", ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
     "pp2-ep2-dp2"),
    # ZeRO-1: every DP rank's optimizer shard is its own file in the checkpoint.
    ("gpt", ["--use-distributed-optimizer", "--expert-model-parallel-size", "2"],
     "zero1-dp4-ep2"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(str(tmp_path_factory.mktemp("corpus") / "synthetic"))


@pytest.mark.parametrize("kind,layout,name", CASES, ids=[c[2] for c in CASES])
def test_resume_is_bitwise_exact(tmp_path, corpus, kind, layout, name):
    base = tiny_run_args(kind, corpus, str(tmp_path)) + layout
    straight, resumed = str(tmp_path / "straight.jsonl"), str(tmp_path / "resumed.jsonl")
    ckpt = str(tmp_path / "ckpt")
    run_entry(kind, base + ["--metrics-jsonl", straight], 4)
    first = run_entry(kind, base + ["--metrics-jsonl", resumed, "--save", ckpt,
                                    "--exit-interval", "10"], 4)
    assert "exiting at iteration 10" in first.stdout
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "10"
    second = run_entry(kind, base + ["--metrics-jsonl", resumed, "--save", ckpt, "--load", ckpt],
                       4)
    assert "resumed from" in second.stdout
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["iteration"] for m in a] == list(range(1, 21))
    assert [m["iteration"] for m in b] == list(range(1, 21))
    assert [m["lm_loss"] for m in a] == [m["lm_loss"] for m in b]
    assert [m["grad_norm"] for m in a] == [m["grad_norm"] for m in b]
    rates = [layer["compression_rate"] for m in a for layer in m["moe"]]
    assert rates and all(0.0 < r <= 1.0 for r in rates)
