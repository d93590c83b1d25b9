"""Training logs: the Megatron line and box, interval averages, JSONL records, TensorBoard."""
import json
import math
import time

import pytest
import torch

from megatron_lsh.config import LoggingConfig
from megatron_lsh.training.logger import (IterationMetrics, MetricsJsonlWriter, TrainingLogger,
                                          format_arguments, format_validation_box,
                                          metrics_record, read_metrics)


def metrics(iteration, loss=2.0, skipped=False, ms=100.0, moe=True):
    layers = [{"compression_rate": 0.2, "bytes_fwd": 1000, "bytes_bwd": 800,
               "aux_loss": torch.tensor(0.01), "rows": 64, "sent_rows": 13},
              {"compression_rate": 0.4, "bytes_fwd": 3000, "bytes_bwd": 2400, "aux_loss": 0.02}]
    return IterationMetrics(iteration=iteration, consumed_samples=8 * iteration, lr=1e-4 * iteration,
                            global_batch_size=8, losses={"lm loss": torch.tensor(loss, dtype=torch.float64)},
                            loss_scale=65536.0, grad_norm=1.5, skipped=skipped, ms_per_iter=ms,
                            tokens=8 * 128, moe=layers if moe else [])


def test_log_line_has_megatron_fields_and_interval_averages(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1.8e9)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1.8e9))
    printed = []
    logger = TrainingLogger(LoggingConfig(log_interval=4), train_iters=100, aux_loss_coeff=0.01,
                            print_fn=printed.append)
    assert logger.log_iteration(metrics(1, loss=1.0, ms=100)) is None
    assert logger.log_iteration(metrics(2, loss=9.0, ms=300, skipped=True)) is None
    assert logger.log_iteration(metrics(3, loss=float("nan"), ms=200)) is None
    line = logger.log_iteration(metrics(4, loss=3.0, ms=200))
    assert printed == [line]
    # Losses average over the iterations that advanced with a finite loss (1 and 4); the
    # load-balancing loss is the layers' mean without the 0.01 weight: (1 + 2) / 2.
    assert line == (
        f" [{stamp}] iteration        4/     100 | consumed samples:           32 |"
        " elapsed time per iteration (ms): 200.0 | learning rate: 4.000000E-04 |"
        " global batch size:     8 | lm loss: 2.000000E+00 | loss scale: 65536.0 |"
        " grad norm: 1.500 | number of skipped iterations:   1 |"
        " number of nan iterations:   1 | load_balancing_loss: 1.500000E+00 |"
        " a2a compression rate: 0.3000 | a2a bytes fwd/bwd: 4.000E+03/3.200E+03 |")
    # The next interval starts from scratch; a dense model has no a2a fields.
    for i in (5, 6, 7):
        logger.log_iteration(metrics(i, loss=4.0, moe=False))
    line = logger.log_iteration(metrics(8, loss=4.0, moe=False))
    assert "lm loss: 4.000000E+00 | loss scale" in line and "a2a" not in line
    assert "number of skipped iterations:   0 | number of nan iterations:   0 |" in line
    assert "load_balancing_loss" not in line


def test_validation_box_is_megatron_style():
    box = format_validation_box(20, {"lm loss": 2.0})
    rule, text, rule2 = box.split("\n")
    assert text == (f" validation loss at iteration 20 | lm loss value: 2.000000E+00 | "
                    f"lm loss PPL: {math.exp(2.0):.6E} | ")
    assert rule == rule2 == "-" * (len(text) + 1)
    assert "PPL: %.6E" % math.exp(20) in format_validation_box(1, {"lm loss": 50.0})


def test_jsonl_record_is_exact_and_complete(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    loss = 2.0 / 3.0 + 1e-12  # needs all 17 significant digits
    logger = TrainingLogger(LoggingConfig(log_interval=10, metrics_jsonl=str(path)),
                            train_iters=10, print_fn=lambda s: None)
    logger.log_iteration(metrics(1, loss=loss))
    logger.log_iteration(metrics(2, skipped=True, moe=False))
    lines = path.read_text().splitlines()  # flushed without closing
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["lm_loss"] == loss  # bit-exact round trip
    assert set(first) == {"iteration", "consumed_samples", "lm_loss", "lr", "grad_norm",
                          "loss_scale", "skipped", "ms_per_iter", "tokens_per_s", "moe"}
    assert (first["iteration"], first["consumed_samples"], first["skipped"]) == (1, 8, False)
    assert first["tokens_per_s"] == pytest.approx(8 * 128 / 0.1)
    assert first["moe"][0] == {"compression_rate": 0.2, "bytes_fwd": 1000, "bytes_bwd": 800,
                               "aux_loss": pytest.approx(0.01), "rows": 64, "sent_rows": 13}
    assert first["moe"][1]["compression_rate"] == 0.4
    second = json.loads(lines[1])
    assert second["skipped"] is True and second["moe"] == []
    logger.close()


def test_jsonl_appends_on_resume_and_drops_what_the_resumed_run_will_redo(tmp_path):
    path = str(tmp_path / "m.jsonl")
    writer = MetricsJsonlWriter(path)
    for i in range(1, 6):
        writer.write(metrics_record(metrics(i)))
    writer.close()
    with open(path, "a") as f:
        f.write('{"iteration": 6, "lm_lo')  # torn by a crash
    writer = MetricsJsonlWriter(path, resume_iteration=3)  # resumed from the iteration-3 checkpoint
    writer.write(metrics_record(metrics(4, loss=7.0)))
    writer.close()
    records = [json.loads(line) for line in open(path)]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["lm_loss"] == 7.0
    MetricsJsonlWriter(path).close()  # without resume_iteration nothing is dropped
    assert len(open(path).readlines()) == 4


def test_disabled_logger_writes_nothing(tmp_path):
    path = tmp_path / "m.jsonl"
    logger = TrainingLogger(LoggingConfig(log_interval=1, metrics_jsonl=str(path)), train_iters=5,
                            enabled=False, print_fn=pytest.fail)
    assert logger.log_iteration(metrics(1)) is None
    assert logger.log_validation(1, {"lm loss": 1.0}) is None
    assert not path.exists()


def test_tensorboard_gets_scalars_for_everything(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    tb_dir = tmp_path / "tb"
    logger = TrainingLogger(LoggingConfig(log_interval=2, tensorboard_dir=str(tb_dir)),
                            train_iters=4, print_fn=lambda s: None)
    for i in (1, 2):
        logger.log_iteration(metrics(i, loss=float(i)))
    logger.log_validation(2, {"lm loss": 1.5}, consumed_samples=16)
    logger.close()
    acc = event_accumulator.EventAccumulator(str(tb_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("learning-rate", "lm loss", "lm loss vs samples", "loss-scale", "grad-norm",
                "iteration-time", "throughput/tokens_per_s", "moe/compression_rate",
                "moe/bytes_fwd", "moe/layer0/compression_rate", "moe/layer1/bytes_bwd",
                "moe/layer0/aux_loss", "moe/layer0/sent_rows", "lm loss validation",
                "lm loss validation ppl"):
        assert tag in tags, tag
    assert [e.value for e in acc.Scalars("lm loss")] == [1.0, 2.0]
    assert acc.Scalars("moe/compression_rate")[0].value == pytest.approx(0.3)
    assert acc.Scalars("lm loss validation ppl")[0].value == pytest.approx(math.exp(1.5))


def test_a_record_shaped_dict_is_accepted():
    printed = []
    logger = TrainingLogger(LoggingConfig(log_interval=1), train_iters=10, global_batch_size=16,
                            print_fn=printed.append)
    record = metrics_record(metrics(2, loss=1.25))
    logger.log_iteration(record)
    assert "global batch size:    16 | lm loss: 1.250000E+00 |" in printed[0]
    assert IterationMetrics.from_record(record, 16).tokens_per_s == record["tokens_per_s"]
    with pytest.raises(ValueError, match="no global_batch_size"):
        TrainingLogger(LoggingConfig(), train_iters=1).log_iteration(record)


def test_validation_goes_to_the_jsonl_and_read_metrics_splits_the_records(tmp_path):
    path = str(tmp_path / "m.jsonl")
    logger = TrainingLogger(LoggingConfig(log_interval=10, metrics_jsonl=path), train_iters=10,
                            print_fn=lambda s: None)
    logger.log_iteration(metrics(1))
    logger.log_validation(1, {"lm loss": 2.5}, consumed_samples=8)
    logger.log_iteration(metrics(2))
    logger.close()
    assert [r["iteration"] for r in read_metrics(path)] == [1, 2]
    (valid,) = read_metrics(path, "validation")
    assert valid == {"iteration": 1, "consumed_samples": 8,
                     "validation": {"lm_loss": 2.5, "lm_loss_ppl": pytest.approx(math.exp(2.5))}}
    assert len(read_metrics(path, None)) == 3


def test_arguments_dump_lists_every_setting_sorted():
    from megatron_lsh.arguments import parse_args
    text = format_arguments(parse_args(["--num-layers", "3", "--moe-a2a-compression", "lsh",
                                        "--moe-lsh-num-hashes", "4"]),
                            {"world_size": 4})
    lines = text.splitlines()
    assert lines[0].strip("- ") == "arguments" and lines[-1].strip("- ") == "end of arguments"
    names = [line.split()[0] for line in lines[1:-1]]
    assert names == sorted(names)
    assert "  num_layers " + "." * (48 - len("num_layers")) + " 3" in lines
    assert any(n.startswith("compression_options.num_hashes") for n in names)
    assert "world_size" in names
