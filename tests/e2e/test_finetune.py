"""finetune_glue.py end to end: from a pretrained checkpoint of another layout, under TP x EP
with LSH, a tiny model learns a small task well above the majority class; results, the
validation record and GLUE submission files are written; a resumed run continues exactly;
regression and MNLI's two dev splits work; bad task files and flags are one sentence.

The tasks are synthetic but in GLUE's exact file formats (``util.write_glue_task``): the
label is decided by a keyword id somewhere in the sentence, which the classifier must find
through attention from the last token.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from tests.e2e.util import (VOCAB, read_metrics, run_entry, run_script, write_glue_task,
                            write_synthetic_corpus)


def finetune_args(task: str, data_dir: str, out: str, *extra: str, epochs: int = 3) -> list:
    """A tiny fine-tuning run (16 steps per epoch of the 256-example train split)."""
    return ["--task", task, "--data-dir", data_dir, "--epochs", str(epochs),
            "--micro-batch-size", "8", "--global-batch-size", "16", "--lr", "1e-3",
            "--lr-warmup-fraction", "0.1", "--log-interval", "8",
            "--results-json", os.path.join(out, "results.json"),
            "--metrics-jsonl", os.path.join(out, "metrics.jsonl"),
            "--distributed-backend", "gloo", *extra]


TINY_MODEL = ["--model-recipe", "tiny-gpt-moe", "--seq-length", "32",
              "--max-position-embeddings", "32", "--tokenizer-type", "NullTokenizer",
              "--vocab-size", str(VOCAB)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny GPT-MoE pretrained 6 iterations in EP=2 (saved in that layout)."""
    work = tmp_path_factory.mktemp("pretrain")
    prefix = write_synthetic_corpus(str(work / "corpus"))
    run_entry("gpt", [*TINY_MODEL, "--data-path", f"{prefix}_document", "--split", "90,10,0",
                      "--data-cache-path", str(work / "cache"), "--micro-batch-size", "4",
                      "--global-batch-size", "8", "--train-iters", "6", "--eval-iters", "0",
                      "--expert-model-parallel-size", "2", "--distributed-backend", "gloo",
                      "--save", str(work / "ckpt")], nproc=2)
    return str(work / "ckpt")


def majority_share(path: str) -> float:
    """The share of the most frequent label in an SST-2 style file."""
    with open(path) as f:
        labels = [line.rstrip("\n").split("\t")[-1] for line in list(f)[1:]]
    return max(Counter(labels).values()) / len(labels)


def test_learns_the_task_under_tp_x_ep_with_lsh_from_another_layout(pretrained, tmp_path):
    data = write_glue_task(str(tmp_path / "SST-2"), "SST-2")
    out = str(tmp_path / "out")
    proc = run_script("finetune_glue.py", finetune_args(
        "SST-2", data, out, "--pretrained-checkpoint", pretrained,
        "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
        "--moe-a2a-compression", "lsh"), nproc=2)
    assert "model and tokenizer from the pretrained checkpoint" in proc.stdout
    assert "fine-tuning from" in proc.stdout
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["task"] == "SST-2" and set(results["dev"]) == {"accuracy"}
    baseline = majority_share(os.path.join(data, "dev.tsv"))
    assert results["dev"]["accuracy"] >= baseline + 0.25, (results["dev"], baseline)
    assert results["epochs_run"] == 3 and len(results["history"]) == 3
    # The dev scores are in the metrics JSONL's validation records, as pretraining's losses.
    validation = read_metrics(os.path.join(out, "metrics.jsonl"), "validation")
    assert [r["iteration"] for r in validation] == [16, 32, 48]
    best = results["history"][results["best_epoch"] - 1]["splits"]["dev"]["accuracy"]
    assert max(r["validation"]["accuracy"] for r in validation) == best
    # LSH really compressed the all-to-all while fine-tuning.
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert max(layer["compression_rate"] for r in rows for layer in r["moe"]) < 1.0
    with open(os.path.join(out, "predictions", "SST-2.tsv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 33
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}
    assert os.path.isfile(os.path.join(out, "results.md"))


def test_a_resumed_run_continues_exactly(tmp_path):
    """Stopped mid-epoch 2 and resumed, the run ends with the dev history and the last
    iterations' losses of an uninterrupted one (dropout on, DP=2)."""
    data = write_glue_task(str(tmp_path / "SST-2"), "SST-2")

    def run(out, *extra):
        return run_script("finetune_glue.py", finetune_args(
            "SST-2", data, str(out), *TINY_MODEL, "--hidden-dropout", "0.1", *extra,
            epochs=2), nproc=2)

    run(tmp_path / "straight")
    ckpt = str(tmp_path / "ckpt")
    first = run(tmp_path / "resumed", "--save", ckpt, "--load", ckpt, "--exit-interval", "24")
    assert "exiting at iteration 24" in first.stdout
    run(tmp_path / "resumed", "--save", ckpt, "--load", ckpt)
    results = {name: json.loads((tmp_path / name / "results.json").read_text())
               for name in ("straight", "resumed")}
    assert results["resumed"]["history"] == results["straight"]["history"]
    losses = {name: {r["iteration"]: r["losses"] for r in read_metrics(
        str(tmp_path / name / "metrics.jsonl"))} for name in ("straight", "resumed")}
    assert losses["resumed"][32] == losses["straight"][32]
    assert losses["resumed"][25] == losses["straight"][25]


@pytest.mark.parametrize("task", ["STS-B", "MNLI"])
def test_regression_and_two_dev_splits(task, tmp_path):
    data = write_glue_task(str(tmp_path / task), task, n_train=64, n_dev=32, n_test=16)
    out = str(tmp_path / "out")
    run_script("finetune_glue.py", finetune_args(task, data, out, *TINY_MODEL, epochs=1),
               nproc=1)
    results = json.loads(open(os.path.join(out, "results.json")).read())
    if task == "STS-B":
        assert set(results["dev"]) == {"pearson", "spearman"}
        with open(os.path.join(out, "predictions", "STS-B.tsv")) as f:
            scores = [float(line.split("\t")[1]) for line in f.read().splitlines()[1:]]
        assert len(scores) == 16 and all(0.0 <= s <= 5.0 for s in scores)
    else:
        assert set(results["dev_splits"]) == {"dev_matched", "dev_mismatched"}
        for name in ("MNLI-m", "MNLI-mm"):
            with open(os.path.join(out, "predictions", f"{name}.tsv")) as f:
                labels = {line.split("\t")[1] for line in f.read().splitlines()[1:]}
            assert labels <= {"contradiction", "entailment", "neutral"}


def _break(folder: str, problem: str) -> str:
    """Damage one file of a written SST-2 task; returns what the error must name."""
    if problem == "missing column":
        path = os.path.join(folder, "train.tsv")
        text = open(path).read().replace("sentence\tlabel", "sentence\tpolarity", 1)
        open(path, "w").write(text)
        return "train.tsv of SST-2"
    if problem == "wrong label":
        path = os.path.join(folder, "dev.tsv")
        lines = open(path).read().splitlines()
        lines[3] = lines[3].rsplit("\t", 1)[0] + "\tpositive"
        open(path, "w").write("\n".join(lines) + "\n")
        return "dev.tsv of SST-2 line 4: label 'positive' is not one of 0, 1"
    path = os.path.join(folder, "dev.tsv")
    open(path, "w").write("sentence\tlabel\n")
    return "has no examples"


@pytest.mark.parametrize("problem", ["missing column", "wrong label", "empty split"])
def test_a_bad_task_file_is_one_sentence(problem, tmp_path):
    data = write_glue_task(str(tmp_path / "SST-2"), "SST-2", n_train=32, n_dev=8, n_test=4)
    expected = _break(data, problem)
    out = str(tmp_path / "out")
    proc = run_script("finetune_glue.py", finetune_args("SST-2", data, out, *TINY_MODEL),
                      nproc=1, check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr[-2000:]
    assert expected in errors[0] and "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(out, "results.json"))


@pytest.mark.parametrize("flags, expected", [
    (["--train-iters", "10"], "--train-iters does not apply to fine-tuning"),
    (["--pretrained-checkpoint", "/nonexistent/ckpt"],
     "--pretrained-checkpoint: checkpoint folder /nonexistent/ckpt does not exist"),
    (["--task", "SST2x"], "--task must be one of CoLA, SST-2"),
])
def test_bad_flags_are_one_sentence(flags, expected, tmp_path):
    data = write_glue_task(str(tmp_path / "SST-2"), "SST-2", n_train=32, n_dev=8, n_test=4)
    model = [] if "--pretrained-checkpoint" in flags else TINY_MODEL
    proc = run_script("finetune_glue.py", [*finetune_args("SST-2", data, str(tmp_path), *model),
                                           *flags], nproc=1, check=False)
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
