"""GLUE's official metrics, written out (no scikit-learn / scipy dependency).

``accuracy``, ``f1`` (of the positive class 1, as GLUE scores MRPC and QQP),
``matthews_corr`` (CoLA), ``pearson`` and ``spearman`` (STS-B; Spearman is Pearson of the
ranks, ties given their average rank). Every function takes the predictions and the labels
as sequences of the same length and returns a float; degenerate inputs (no positive
prediction and no positive label, a constant series) give 0.0, as scikit-learn / scipy
conventions do for F1 and MCC.
"""
from __future__ import annotations

import math
from typing import Sequence


def _check(predictions: Sequence, labels: Sequence) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no labels to score")


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Share of predictions equal to their label."""
    _check(predictions, labels)
    return sum(int(p) == int(y) for p, y in zip(predictions, labels)) / len(labels)


def _confusion(predictions, labels):
    tp = sum(1 for p, y in zip(predictions, labels) if p == 1 and y == 1)
    fp = sum(1 for p, y in zip(predictions, labels) if p == 1 and y != 1)
    fn = sum(1 for p, y in zip(predictions, labels) if p != 1 and y == 1)
    tn = len(labels) - tp - fp - fn
    return tp, fp, fn, tn


def f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of class 1: ``2 tp / (2 tp + fp + fn)``."""
    _check(predictions, labels)
    tp, fp, fn, _ = _confusion([int(p) for p in predictions], [int(y) for y in labels])
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corr(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient of a binary task."""
    _check(predictions, labels)
    tp, fp, fn, tn = _confusion([int(p) for p in predictions], [int(y) for y in labels])
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson correlation of two series."""
    _check(predictions, labels)
    n = len(labels)
    mx, my = sum(predictions) / n, sum(labels) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(predictions, labels))
    sxx = sum((x - mx) ** 2 for x in predictions)
    syy = sum((y - my) ** 2 for y in labels)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else 0.0


def _ranks(values: Sequence[float]) -> list:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):   # ties share their average rank
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of the average ranks)."""
    _check(predictions, labels)
    return pearson(_ranks(predictions), _ranks(labels))


METRICS = {f.__name__: f for f in (accuracy, f1, matthews_corr, pearson, spearman)}
"""Every metric by the name a :class:`~megatron_lsh.glue.data.GlueTask` lists."""


def score(task, predictions: Sequence, labels: Sequence) -> dict:
    """``{metric name: value}`` of ``task``'s official metrics."""
    return {name: METRICS[name](predictions, labels) for name in task.metrics}
