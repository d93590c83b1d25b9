"""tools/plot_run.py draws a run's metrics (and several runs together) as PNGs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megatron_lsh.config import LoggingConfig
from megatron_lsh.training.logger import IterationMetrics, TrainingLogger

REPO = Path(__file__).resolve().parents[2]


def write_run(folder: Path, rate: float, moe: bool = True) -> None:
    folder.mkdir(parents=True)
    config = LoggingConfig(log_interval=100, metrics_jsonl=str(folder / "metrics.jsonl"))
    logger = TrainingLogger(config, train_iters=30, global_batch_size=8, print_fn=lambda s: None)
    for i in range(1, 31):
        layers = [{"compression_rate": rate, "bytes_fwd": 1000 * rate, "bytes_bwd": 900 * rate,
                   "aux_loss": 0.01}] if moe else []
        logger.log_iteration(IterationMetrics(i, 8 * i, 1e-3, 8, {"lm loss": 5.0 - i / 10}, 1.0,
                                              1.0, False, 50.0, moe=layers))
        if i % 10 == 0:
            logger.log_validation(i, {"lm loss": 5.2 - i / 10}, 8 * i)
    logger.close()


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "plot_run.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_two_runs_on_one_set_of_axes(tmp_path):
    write_run(tmp_path / "none", 1.0)
    write_run(tmp_path / "lsh", 0.2)
    proc = run(tmp_path / "none", tmp_path / "lsh")
    assert proc.returncode == 0, proc.stderr
    for name in ("loss.png", "compression.png", "a2a_bytes.png"):
        data = (tmp_path / name).read_bytes()   # the common parent folder
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"wrote {tmp_path / name}" in proc.stdout


def test_dense_run_gets_only_the_loss(tmp_path):
    write_run(tmp_path / "dense", 1.0, moe=False)
    proc = run(tmp_path / "dense", "--out", tmp_path / "plots")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png"]


def test_missing_run_is_one_sentence(tmp_path):
    proc = run(tmp_path / "nothing")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: {tmp_path / 'nothing'} does not exist (give a run "
                                   f"folder holding metrics.jsonl, or the file; --metrics-jsonl "
                                   f"writes it)")
    (tmp_path / "empty").mkdir()
    proc = run(tmp_path / "empty")
    assert proc.returncode == 1 and f"error: {tmp_path / 'empty' / 'metrics.jsonl'} does not" \
        in proc.stderr
