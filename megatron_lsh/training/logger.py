"""Training logs: Megatron's log line and validation box, TensorBoard scalars, per-iteration JSONL.

The loop hands one :class:`IterationMetrics` per iteration to :meth:`TrainingLogger.log_iteration`:

- every ``log_interval`` iterations it prints Megatron's line (averages over the interval)::

    [2026-12-02 10:00:00] iteration       20/     100 | consumed samples:          160 |
    elapsed time per iteration (ms): 412.3 | learning rate: 2.000000E-04 | global batch
    size:     8 | lm loss: 7.012345E+00 | loss scale: 1.0 | grad norm: 1.234 | number of
    skipped iterations:   0 | number of nan iterations:   0 | load_balancing_loss:
    1.002345E+00 | a2a compression rate: 0.2031 | a2a bytes fwd/bwd: 1.049E+06/1.049E+06 |

  (one line; wrapped here). The loss is averaged over the interval's non-skipped iterations
  whose loss is finite (the others count as nan iterations), the time, compression rate and
  bytes over all of them; lr, loss scale, grad norm are the latest values.
  ``load_balancing_loss`` is the router's load-balancing loss as Megatron reports it: without
  its coefficient, the mean over MoE layers (shown when the coefficient is positive);
- every iteration it writes TensorBoard scalars (Megatron's tag names, plus
  ``moe/layer{i}/<stat>`` for each MoE layer) and one JSON object to the ``--metrics-jsonl``
  file (:func:`metrics_record`): floats go through ``json.dumps``, which writes the shortest
  repr that reads back as the identical float;
- every validation pass writes the box, ``<loss> validation`` scalars and a JSONL record
  ``{"iteration", "consumed_samples", "validation": {"lm_loss": ..., "lm_loss_ppl": ...}}``
  (:func:`read_metrics` splits the two kinds of record).

:func:`format_arguments` is Megatron's arguments dump, printed once at start.

Only the rank that owns the loss (the last pipeline stage, first TP/DP rank) should log; the
others build the logger with ``enabled=False``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from megatron_lsh.config import LoggingConfig

MOE_REQUIRED_STATS = ("compression_rate", "bytes_fwd", "bytes_bwd", "aux_loss")
"""Per-MoE-layer stats every JSONL record carries (None when the layer did not report one)."""


@dataclass
class IterationMetrics:
    """What one training iteration reports; ``moe`` holds one mapping per MoE layer."""

    iteration: int
    consumed_samples: int
    lr: float
    global_batch_size: int
    losses: Mapping[str, float]
    """Reduced losses by Megatron name, e.g. ``{"lm loss": 2.31}``."""
    loss_scale: float
    grad_norm: Optional[float]
    skipped: bool
    ms_per_iter: float
    tokens: int = 0
    """Tokens processed in this iteration (all ranks), for tokens/s."""
    moe: Sequence[Any] = field(default_factory=list)
    """Per MoE layer: a mapping (or dataclass) with compression_rate, bytes_fwd, bytes_bwd,
    aux_loss and any other numeric stats (rows, centroids, cos, timings)."""
    tokens_per_s: Optional[float] = None
    """Throughput, when the caller measured it; otherwise computed from ``tokens``."""
    timers: Optional[Mapping[str, float]] = None
    """Stage times of the step in ms (``--timing-log-level`` >= 1), or None."""

    @classmethod
    def from_record(cls, record: Mapping[str, Any],
                    global_batch_size: Optional[int] = None) -> "IterationMetrics":
        """From a dict shaped like a JSONL record (``lm_loss``, ``lr``, ... see the module doc)."""
        losses = {"lm loss": record["lm_loss"]} if record.get("lm_loss") is not None else {}
        losses.update({k.replace("_", " "): v for k, v in record.get("losses", {}).items()})
        gbs = record.get("global_batch_size", global_batch_size)
        if gbs is None:
            raise ValueError("iteration metrics have no global_batch_size; pass it to "
                             "TrainingLogger(global_batch_size=...)")
        return cls(iteration=record["iteration"], consumed_samples=record["consumed_samples"],
                   lr=record["lr"], global_batch_size=gbs, losses=losses,
                   loss_scale=record.get("loss_scale", 1.0), grad_norm=record.get("grad_norm"),
                   skipped=bool(record.get("skipped", False)), ms_per_iter=record["ms_per_iter"],
                   tokens=record.get("tokens", 0), moe=record.get("moe", []),
                   tokens_per_s=record.get("tokens_per_s"), timers=record.get("timers"))


def _number(value: Any) -> Any:
    """A python int / float / bool / None from a number or a one-element tensor."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return float(value)


def _layer_stats(layer: Any) -> dict:
    if dataclasses.is_dataclass(layer) and not isinstance(layer, type):
        layer = dataclasses.asdict(layer)
    if not isinstance(layer, Mapping):
        raise TypeError(f"MoE layer stats must be a mapping or a dataclass, got "
                        f"{type(layer).__name__}")
    stats = {key: _number(layer.get(key)) for key in MOE_REQUIRED_STATS}
    for key, value in layer.items():
        if key not in stats:
            try:
                stats[key] = _number(value)
            except (TypeError, ValueError, RuntimeError):
                continue  # not a scalar: not logged
    return stats


def _snake(name: str) -> str:
    return name.strip().replace(" ", "_").replace("-", "_")


def metrics_record(m: IterationMetrics) -> dict:
    """The JSONL object of one iteration (see the module docstring)."""
    losses = {key: _number(value) for key, value in m.losses.items()}
    seconds = m.ms_per_iter / 1000.0
    tokens_per_s = _number(m.tokens_per_s)
    if tokens_per_s is None and m.tokens and seconds > 0:
        tokens_per_s = m.tokens / seconds
    record = {
        "iteration": int(m.iteration),
        "consumed_samples": int(m.consumed_samples),
        "lm_loss": losses.get("lm loss"),
        "lr": _number(m.lr),
        "grad_norm": _number(m.grad_norm),
        "loss_scale": _number(m.loss_scale),
        "skipped": bool(m.skipped),
        "ms_per_iter": _number(m.ms_per_iter),
        "tokens_per_s": tokens_per_s,
        "moe": [_layer_stats(layer) for layer in m.moe],
    }
    others = {_snake(k): v for k, v in losses.items() if k != "lm loss"}
    if others:
        record["losses"] = others
    if m.timers is not None:
        record["timers"] = {str(k): float(_number(v)) for k, v in m.timers.items()}
    return record


class MetricsJsonlWriter:
    """Appends one JSON object per line, flushed at once, so a crash loses at most one line.

    With ``resume_iteration``, lines for later iterations (written by a run that went on past
    the checkpoint it is now resumed from) and a torn last line are dropped first, so the file
    reads as one uninterrupted run.
    """

    def __init__(self, path: str, resume_iteration: Optional[int] = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_iteration is not None and os.path.isfile(path):
            self._drop_after(resume_iteration)
        self._file = open(path, "a")

    def _drop_after(self, iteration: int) -> None:
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # torn by a crash
            if isinstance(record, dict) and record.get("iteration", 0) <= iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        """Append ``record`` as one line and flush it."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._file.closed:
            self._file.close()


def read_metrics(path: str, kind: Optional[str] = "iteration") -> list:
    """The records of a ``--metrics-jsonl`` file: ``kind`` 'iteration' (one per training
    iteration), 'validation' (one per validation pass) or None (all, in file order)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if kind is None:
        return records
    want_validation = kind == "validation"
    return [r for r in records if ("validation" in r) == want_validation]


def format_arguments(config: Any, extra: Optional[Mapping[str, Any]] = None) -> str:
    """Megatron's arguments dump: every setting, sorted by name, dotted to its value."""
    flat: dict[str, Any] = {}
    for section, values in dataclasses.asdict(config).items():
        for name, value in values.items():
            if isinstance(value, dict):   # a compressor's options
                flat.update({f"{name}.{k}": v for k, v in value.items()})
            else:
                flat[name] = value
    flat.update(extra or {})
    lines = ["------------------------ arguments ------------------------"]
    for name in sorted(flat):
        dots = "." * max(1, 48 - len(name))
        lines.append(f"  {name} {dots} {flat[name]}")
    lines.append("-------------------- end of arguments ---------------------")
    return "\n".join(lines)


def open_tensorboard(log_dir: str):
    """A ``SummaryWriter`` for ``log_dir``, or None (with a warning) if TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn(f"--tensorboard-dir {log_dir} is set but the tensorboard package is not "
                      f"installed (pip install tensorboard); TensorBoard logging is off")
        return None
    return SummaryWriter(log_dir=log_dir, max_queue=1000)


def format_iteration_line(iteration: int, train_iters: int, consumed_samples: int,
                          ms_per_iter: float, lr: float, global_batch_size: int,
                          losses: Mapping[str, float], loss_scale: float,
                          grad_norm: Optional[float], skipped_iters: int,
                          compression_rate: Optional[float] = None,
                          bytes_fwd: Optional[float] = None,
                          bytes_bwd: Optional[float] = None, nan_iters: int = 0,
                          load_balancing_loss: Optional[float] = None,
                          timestamp: Optional[float] = None) -> str:
    """Megatron's per-interval log line, with the a2a fields when there are MoE layers."""
    when = time.strftime("%Y-%m-%d %H:%M:%S",
                         time.localtime(time.time() if timestamp is None else timestamp))
    line = f" [{when}] iteration {iteration:8d}/{train_iters:8d} |"
    line += f" consumed samples: {consumed_samples:12d} |"
    line += f" elapsed time per iteration (ms): {ms_per_iter:.1f} |"
    line += f" learning rate: {lr:.6E} |"
    line += f" global batch size: {global_batch_size:5d} |"
    for key, value in losses.items():
        line += f" {key}: {value:.6E} |"
    line += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        line += f" grad norm: {grad_norm:.3f} |"
    line += f" number of skipped iterations: {skipped_iters:3d} |"
    line += f" number of nan iterations: {nan_iters:3d} |"
    if load_balancing_loss is not None:
        line += f" load_balancing_loss: {load_balancing_loss:.6E} |"
    if compression_rate is not None:
        line += f" a2a compression rate: {compression_rate:.4f} |"
        line += f" a2a bytes fwd/bwd: {bytes_fwd or 0:.3E}/{bytes_bwd or 0:.3E} |"
    return line


def format_timers_line(timers: Mapping[str, float]) -> str:
    """The stage timers of the interval (ms per iteration, mean over ranks), one line."""
    parts = [f"{name.replace('_', '-')}: {value:.1f}" for name, value in timers.items()]
    return " time per iteration (ms, mean over ranks) | " + " | ".join(parts) + " |"


def format_validation_box(iteration: int, losses: Mapping[str, float],
                          prefix: str = "validation loss at",
                          scores: Optional[Mapping[str, float]] = None) -> str:
    """Megatron's boxed validation report (three lines); PPL is ``exp(min(20, loss))``;
    ``scores`` (e.g. a fine-tuning task's accuracy) follow the losses, without PPL."""
    text = f" {prefix} iteration {iteration} | "
    for key, value in losses.items():
        value = _number(value)
        text += f"{key} value: {value:.6E} | {key} PPL: {math.exp(min(20.0, value)):.6E} | "
    for key, value in (scores or {}).items():
        text += f"{key}: {float(_number(value)):.4f} | "
    rule = "-" * (len(text) + 1)
    return f"{rule}\n{text}\n{rule}"


class TrainingLogger:
    """Console line every ``log_interval`` iterations; TensorBoard and JSONL every iteration."""

    def __init__(self, config: LoggingConfig, *, train_iters: int, enabled: bool = True,
                 resume_iteration: Optional[int] = None, global_batch_size: Optional[int] = None,
                 aux_loss_coeff: float = 0.0,
                 print_fn: Callable[[str], None] = lambda s: print(s, flush=True)):
        """``aux_loss_coeff``: the router's load-balancing weight, to report the loss without
        it (``load_balancing_loss``); 0 leaves that field out."""
        self.config, self.train_iters, self.enabled = config, train_iters, enabled
        self.aux_loss_coeff = aux_loss_coeff
        self.global_batch_size = global_batch_size
        self.print_fn = print_fn
        self.tensorboard = None
        self.jsonl = None
        if enabled and config.tensorboard_dir:
            self.tensorboard = open_tensorboard(config.tensorboard_dir)
        if enabled and config.metrics_jsonl:
            self.jsonl = MetricsJsonlWriter(config.metrics_jsonl, resume_iteration)
        self._reset_interval()

    def _reset_interval(self) -> None:
        self._count = self._advanced = self._skipped = self._nan = 0
        self._balance_iters, self._balance = 0, 0.0
        self._ms = 0.0
        self._losses: dict[str, float] = {}
        self._moe_iters = 0
        self._rate = self._bytes_fwd = self._bytes_bwd = 0.0
        self._timers: dict[str, float] = {}

    def log_iteration(self, m: IterationMetrics | Mapping[str, Any]) -> Optional[str]:
        """Record one iteration; returns the printed line on log-interval iterations.

        ``m`` may also be a dict shaped like a JSONL record (:meth:`IterationMetrics.from_record`).
        """
        if not self.enabled:
            return None
        if not isinstance(m, IterationMetrics):
            m = IterationMetrics.from_record(m, self.global_batch_size)
        record = metrics_record(m)
        if self.jsonl is not None:
            self.jsonl.write(record)
        if self.tensorboard is not None:
            self._tensorboard_iteration(m, record)
        self._accumulate(m, record)
        if m.iteration % self.config.log_interval:
            return None
        moe = self._moe_iters > 0
        line = format_iteration_line(
            m.iteration, self.train_iters, int(m.consumed_samples), self._ms / self._count,
            float(record["lr"]), int(m.global_batch_size),
            {k: v / self._advanced for k, v in self._losses.items()}, float(record["loss_scale"]),
            record["grad_norm"], self._skipped,
            self._rate / self._moe_iters if moe else None,
            self._bytes_fwd / self._moe_iters if moe else None,
            self._bytes_bwd / self._moe_iters if moe else None, nan_iters=self._nan,
            load_balancing_loss=(self._balance / self._balance_iters if self._balance_iters
                                 else None))
        if self._timers:
            line += "\n" + format_timers_line({k: v / self._count
                                               for k, v in self._timers.items()})
        self._reset_interval()
        self.print_fn(line)
        return line

    def _accumulate(self, m: IterationMetrics, record: dict) -> None:
        self._count += 1
        self._ms += float(m.ms_per_iter)
        for key, value in (record.get("timers") or {}).items():
            self._timers[key] = self._timers.get(key, 0.0) + value
        values = {key: float(_number(value)) for key, value in m.losses.items()}
        if m.skipped:
            self._skipped += 1
        elif not all(math.isfinite(v) for v in values.values()):
            self._nan += 1
        else:
            self._advanced += 1
            for key, value in values.items():
                self._losses[key] = self._losses.get(key, 0.0) + value
        balance = self.load_balancing_loss(record)
        if balance is not None:
            self._balance_iters += 1
            self._balance += balance
        rates = [s["compression_rate"] for s in record["moe"] if s["compression_rate"] is not None]
        if rates:
            self._moe_iters += 1
            self._rate += sum(rates) / len(rates)
            self._bytes_fwd += sum(s["bytes_fwd"] or 0 for s in record["moe"])
            self._bytes_bwd += sum(s["bytes_bwd"] or 0 for s in record["moe"])

    def load_balancing_loss(self, record: dict) -> Optional[float]:
        """The iteration's load-balancing loss as Megatron reports it (unscaled, mean over MoE
        layers), or None without MoE layers or a load-balancing weight."""
        values = [s["aux_loss"] for s in record["moe"] if s.get("aux_loss") is not None]
        if not values or self.aux_loss_coeff <= 0:
            return None
        return sum(values) / len(values) / self.aux_loss_coeff

    def _tensorboard_iteration(self, m: IterationMetrics, record: dict) -> None:
        tb, step, samples = self.tensorboard, m.iteration, record["consumed_samples"]
        tb.add_scalar("learning-rate", record["lr"], step)
        tb.add_scalar("learning-rate vs samples", record["lr"], samples)
        tb.add_scalar("batch-size", m.global_batch_size, step)
        if not m.skipped:
            for key, value in m.losses.items():
                tb.add_scalar(key, _number(value), step)
                tb.add_scalar(f"{key} vs samples", _number(value), samples)
        tb.add_scalar("loss-scale", record["loss_scale"], step)
        if record["grad_norm"] is not None:
            tb.add_scalar("grad-norm", record["grad_norm"], step)
        tb.add_scalar("skipped-iterations", int(m.skipped), step)
        tb.add_scalar("iteration-time", record["ms_per_iter"] / 1000.0, step)
        if record["tokens_per_s"] is not None:
            tb.add_scalar("throughput/tokens_per_s", record["tokens_per_s"], step)
        balance = self.load_balancing_loss(record)
        if balance is not None:
            tb.add_scalar("load_balancing_loss", balance, step)
            tb.add_scalar("load_balancing_loss vs samples", balance, samples)
        for name in MOE_REQUIRED_STATS:
            values = [s[name] for s in record["moe"] if s[name] is not None]
            if values:
                total = sum(values)
                tb.add_scalar(f"moe/{name}", total / len(values) if name == "compression_rate"
                              else total, step)
        for i, stats in enumerate(record["moe"]):
            for name, value in stats.items():
                if value is not None:
                    tb.add_scalar(f"moe/layer{i}/{name}", value, step)

    def log_validation(self, iteration: int, losses: Mapping[str, float],
                       consumed_samples: Optional[int] = None,
                       prefix: str = "validation loss at",
                       scores: Optional[Mapping[str, float]] = None) -> Optional[str]:
        """Print the validation box and write ``<loss> validation`` (and ppl) scalars;
        ``scores`` (metrics that are not losses: accuracy, F1, ...) are written as they are,
        ``<score> validation`` in TensorBoard and ``<score>`` in the JSONL record."""
        if not self.enabled:
            return None
        box = format_validation_box(iteration, losses, prefix, scores)
        self.print_fn(box)
        scores = {k: float(_number(v)) for k, v in (scores or {}).items()}
        if self.jsonl is not None:
            values = {_snake(k): float(_number(v)) for k, v in losses.items()}
            values.update({f"{k}_ppl": math.exp(min(20.0, v)) for k, v in list(values.items())})
            values.update({_snake(k): v for k, v in scores.items()})
            self.jsonl.write({"iteration": int(iteration),
                              "consumed_samples": _number(consumed_samples),
                              "validation": values})
        if self.tensorboard is not None:
            for key, value in losses.items():
                value = _number(value)
                ppl = math.exp(min(20.0, value))
                self.tensorboard.add_scalar(f"{key} validation", value, iteration)
                self.tensorboard.add_scalar(f"{key} validation ppl", ppl, iteration)
                if consumed_samples is not None:
                    self.tensorboard.add_scalar(f"{key} validation vs samples", value,
                                                consumed_samples)
                    self.tensorboard.add_scalar(f"{key} validation ppl vs samples", ppl,
                                                consumed_samples)
            for key, value in scores.items():
                self.tensorboard.add_scalar(f"{key} validation", value, iteration)
        return box

    def flush(self) -> None:
        """Push pending TensorBoard events to disk."""
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        """Flush and close TensorBoard and the JSONL file."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
