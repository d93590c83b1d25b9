"""GLUE's task files as GLUE distributes them: one folder per task, ``train.tsv`` /
``dev.tsv`` / ``test.tsv`` (MNLI: ``dev_matched``, ``dev_mismatched``, ``test_matched``,
``test_mismatched``), each task with its own columns.

Files are read as tab-separated text without quote processing (GLUE's sentences contain
unbalanced quotes). Columns are found by their header names; CoLA's train and dev files have
no header (source, label, original label, sentence). Labels are checked against the task's
label set; a bad file is one :class:`GlueDataError` sentence naming the file, the line and
the problem. Test files carry GLUE's ``index`` (or ``id``) column, which the submission files
repeat.
"""
from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence


class GlueDataError(ValueError):
    """A GLUE task file that cannot be read: one sentence naming file, line and problem."""


@dataclass(frozen=True)
class GlueTask:
    """What a GLUE task's files look like and how it is scored."""

    name: str
    text_columns: tuple
    """One column (single sentence) or two (a pair), by header name."""
    label_column: Optional[str]
    labels: Optional[tuple]
    """The label set in class order; None for regression (STS-B)."""
    metrics: tuple
    """Its official metrics (names of :mod:`megatron_lsh.glue.metrics` functions)."""
    dev_splits: tuple = ("dev",)
    test_splits: tuple = ("test",)
    header: bool = True
    test_index_column: str = "index"

    @property
    def is_regression(self) -> bool:
        """True for STS-B (a similarity score in [0, 5])."""
        return self.labels is None

    @property
    def num_classes(self) -> int:
        """Outputs of the task's head (1 for regression)."""
        return 1 if self.labels is None else len(self.labels)


NLI = ("entailment", "not_entailment")
TASKS = {t.name: t for t in (
    GlueTask("CoLA", ("sentence",), "label", ("0", "1"), ("matthews_corr", "accuracy"),
             header=False),
    GlueTask("SST-2", ("sentence",), "label", ("0", "1"), ("accuracy",)),
    GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("f1", "accuracy")),
    GlueTask("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("f1", "accuracy"),
             test_index_column="id"),
    GlueTask("STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman")),
    GlueTask("MNLI", ("sentence1", "sentence2"), "gold_label",
             ("contradiction", "entailment", "neutral"), ("accuracy",),
             dev_splits=("dev_matched", "dev_mismatched"),
             test_splits=("test_matched", "test_mismatched")),
    GlueTask("QNLI", ("question", "sentence"), "label", NLI, ("accuracy",)),
    GlueTask("RTE", ("sentence1", "sentence2"), "label", NLI, ("accuracy",)),
    GlueTask("WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), ("accuracy",)),
)}
"""GLUE's nine tasks by their names."""

COLA_COLUMNS = ("source", "label", "original_label", "sentence")
"""CoLA's train / dev files have these four columns and no header."""


def get_task(name: str) -> GlueTask:
    """The task called ``name`` (GLUE's spelling; case and a missing hyphen are forgiven)."""
    for task_name, task in TASKS.items():
        if name.replace("-", "").lower() == task_name.replace("-", "").lower():
            return task
    raise GlueDataError(f"--task must be one of {', '.join(TASKS)}, got {name!r}")


@dataclass
class Example:
    """One line of a task file: its text(s), label (None in test files) and GLUE index."""

    texts: tuple
    label: Optional[object]
    """A class index, or a float score for STS-B."""
    index: str


def _rows(path: str) -> List[List[str]]:
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                    if row and any(cell.strip() for cell in row)]
    except UnicodeDecodeError as error:
        raise GlueDataError(f"{path} is not UTF-8 text (byte {error.start})") from None


def read_split(task: GlueTask, data_dir: str, split: str) -> List[Example]:
    """The examples of ``split`` (``train``, ``dev``, ``test_matched``, ...) of ``task``."""
    path = os.path.join(data_dir, f"{split}.tsv")
    if not os.path.isfile(path):
        raise GlueDataError(f"{task.name} has no {split}.tsv in {data_dir}")
    rows = _rows(path)
    is_test = split.startswith("test")
    name = f"{split}.tsv of {task.name}"
    if task.header or is_test:
        if not rows:
            raise GlueDataError(f"{name} ({path}) is empty")
        header, rows, first_line = [c.strip() for c in rows[0]], rows[1:], 2
    else:
        header, first_line = list(COLA_COLUMNS), 1
    needed = list(task.text_columns)
    if is_test:
        needed.append(task.test_index_column)
    else:
        needed.append(task.label_column)
    missing = [c for c in needed if c not in header]
    if missing:
        raise GlueDataError(f"{name} ({path}) has no column {missing[0]!r} (its columns: "
                            f"{', '.join(header)})")
    where = {c: header.index(c) for c in needed}
    examples = []
    for offset, row in enumerate(rows):
        line = first_line + offset
        if len(row) < len(header) and len(row) <= max(where.values()):
            raise GlueDataError(f"{name} line {line} has {len(row)} fields, the header has "
                                f"{len(header)}")
        texts = tuple(row[where[c]].strip() for c in task.text_columns)
        label, index = None, str(offset)
        if is_test:
            index = row[where[task.test_index_column]].strip()
        else:
            label = _label(task, row[where[task.label_column]].strip(), name, line)
        examples.append(Example(texts, label, index))
    if not examples:
        raise GlueDataError(f"{name} ({path}) has no examples")
    return examples


def _label(task: GlueTask, text: str, name: str, line: int):
    if task.is_regression:
        try:
            return float(text)
        except ValueError:
            raise GlueDataError(f"{name} line {line}: score {text!r} is not a number") from None
    if text not in task.labels:
        raise GlueDataError(f"{name} line {line}: label {text!r} is not one of "
                            f"{', '.join(task.labels)}")
    return task.labels.index(text)


SUBMISSION_NAMES = {"CoLA": ("CoLA",), "SST-2": ("SST-2",), "MRPC": ("MRPC",),
                    "QQP": ("QQP",), "STS-B": ("STS-B",), "MNLI": ("MNLI-m", "MNLI-mm"),
                    "QNLI": ("QNLI",), "RTE": ("RTE",), "WNLI": ("WNLI",)}
"""GLUE's submission file name(s) per task (MNLI: matched, mismatched)."""


def write_predictions(task: GlueTask, path: str, examples: Sequence[Example],
                      predictions: Sequence) -> None:
    """A GLUE submission file: ``index<TAB>prediction`` lines under that header; class
    predictions as GLUE's label strings (``entailment``, ``1``), STS-B scores clipped to
    [0, 5]. Written whole (temp file, then rename)."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("index\tprediction\n")
        for example, prediction in zip(examples, predictions):
            if task.is_regression:
                value = f"{min(5.0, max(0.0, float(prediction))):.3f}"
            else:
                value = task.labels[int(prediction)]
            f.write(f"{example.index}\t{value}\n")
    os.replace(tmp, path)
