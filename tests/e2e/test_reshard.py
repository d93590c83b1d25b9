"""Train in one parallel layout, load the checkpoint into another, continue: the loss curve
goes on as if the first layout had continued (fp32, rtol 1e-5), LSH on.

Dropout is off: RNG states belong to the ranks of a layout and are not carried over, so with
dropout the continuation would draw other masks (a different, equally valid run).
"""
import os

import pytest

from tests.e2e.util import read_metrics, run_entry, tiny_run_args, write_synthetic_corpus

EP4 = ["--expert-model-parallel-size", "4"]
TP2_EP2 = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"]
TP2_PP2_EP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
               "--expert-model-parallel-size", "2"]
ZERO1 = ["--use-distributed-optimizer"]
CASES = [("ep4-to-tp2ep2", EP4, 4, TP2_EP2, 4),
         ("tp2pp2ep2-to-ep4", TP2_PP2_EP2, 4, EP4, 4),
         ("zero1-dp4-to-dp2", ZERO1, 4, ZERO1, 2)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(str(tmp_path_factory.mktemp("corpus") / "synthetic"))


def _args(corpus, tmp_path):
    return tiny_run_args("gpt", corpus, str(tmp_path)) + ["--hidden-dropout", "0.0",
                                                          "--attention-dropout", "0.0"]


@pytest.mark.parametrize("name,first,first_n,second,second_n", CASES, ids=[c[0] for c in CASES])
def test_continue_in_another_layout(tmp_path, corpus, name, first, first_n, second, second_n):
    base = _args(corpus, tmp_path)
    straight, resharded = str(tmp_path / "straight.jsonl"), str(tmp_path / "resharded.jsonl")
    ckpt = str(tmp_path / "ckpt")
    run_entry("gpt", base + first + ["--metrics-jsonl", straight], first_n)
    run_entry("gpt", base + first + ["--metrics-jsonl", resharded, "--save", ckpt,
                                     "--exit-interval", "10"], first_n)
    proc = run_entry("gpt", base + second + ["--metrics-jsonl", resharded, "--load", ckpt,
                                             "--save", str(tmp_path / "ckpt2")], second_n)
    assert "resharded (" in proc.stdout and "at iteration 10" in proc.stdout
    a, b = read_metrics(straight), read_metrics(resharded)
    assert [m["iteration"] for m in b] == list(range(1, 21))
    for want, got in zip(a[10:], b[10:]):
        assert got["lm_loss"] == pytest.approx(want["lm_loss"], rel=1e-5), got["iteration"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), got["iteration"]
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
    rates = [layer["compression_rate"] for m in b[10:] for layer in m["moe"]]
    assert rates and all(0.0 < r < 1.0 for r in rates)   # LSH merged rows after the reshard
