"""Flags shared with Megatron-LM mean what they mean there: sample-based lengths, the static
loss scale, unweighted data blends, quoted splits and the mock corpus."""
from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_lsh.arguments import parse_args
from megatron_lsh.config import ConfigError, OptimizerConfig
from megatron_lsh.data.builder import build_train_valid_test_datasets
from megatron_lsh.data.indexed import IndexedDataset, write_dataset
from megatron_lsh.data.mock import mock_data_prefix
from megatron_lsh.parallel.loss_scaler import StaticLossScaler
from megatron_lsh.parallel.optimizer_factory import build_loss_scaler
from megatron_lsh.training.lr_schedule import OptimizerParamScheduler


def _megatron_lr(samples, *, lr, min_lr, warmup, decay):
    """Megatron's cosine schedule evaluated at ``samples`` consumed (written out here)."""
    if samples <= warmup:
        return lr * samples / warmup
    ratio = (samples - warmup) / (decay - warmup)
    if ratio > 1:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def test_train_samples_become_iterations_with_megatrons_schedule():
    config = parse_args(["--train-samples", "1000", "--lr-warmup-samples", "60",
                         "--lr-decay-samples", "900", "--lr", "1e-3", "--min-lr", "1e-5",
                         "--global-batch-size", "16", "--micro-batch-size", "2"])
    assert config.training.train_iters is None
    resolved = config.resolved_for_batch(16)
    assert resolved.training.train_iters == 62          # 1000 // 16
    scheduler = OptimizerParamScheduler.from_config(type("O", (), {"param_groups": [{}]})(),
                                                    resolved.optimizer,
                                                    resolved.training.train_iters)
    for step in range(1, 63):
        scheduler.step(1)
        want = _megatron_lr(16 * step, lr=1e-3, min_lr=1e-5, warmup=60, decay=900)
        assert scheduler.get_lr() == pytest.approx(want, rel=1e-9), step


@pytest.mark.parametrize("argv, message", [
    (["--train-samples", "100", "--train-iters", "5"], "cannot both be set"),
    (["--lr-warmup-samples", "10"], "need --train-samples"),
    (["--train-samples", "100", "--lr-decay-iters", "5"], "the schedule is in samples"),
])
def test_sample_and_iteration_settings_do_not_mix(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_fewer_train_samples_than_a_batch():
    config = parse_args(["--train-samples", "4"])
    with pytest.raises(ConfigError, match="smaller than one global batch"):
        config.resolved_for_batch(8)


def test_static_loss_scale_keeps_its_scale_and_still_skips_overflows():
    scaler = build_loss_scaler(OptimizerConfig(fp16=True, loss_scale=1024.0))
    assert isinstance(scaler, StaticLossScaler) and scaler.dynamic
    scaler.update(found_inf=True)
    scaler.update(found_inf=False)
    assert scaler.scale == 1024.0
    assert build_loss_scaler(OptimizerConfig(fp16=True)).scale == 2.0 ** 32


def test_split_with_quotes_left_in_by_a_launch_script():
    assert parse_args(["--split", "'99,1,0'"]).data.split == "99,1,0"
    assert parse_args(["--split", '"98, 2"']).data.split == "98,2"


def test_unweighted_prefixes_blend_by_tokens(tmp_path):
    big, small = str(tmp_path / "big"), str(tmp_path / "small")
    write_dataset(big, [[1] * 300 for _ in range(6)])     # 1800 tokens
    write_dataset(small, [[2] * 100 for _ in range(6)])   # 600 tokens
    train, _, _ = build_train_valid_test_datasets(
        "gpt", seq_length=10, seed=0, num_samples=(400, None, None), data_path=[big, small],
        split="100,0,0", cache_dir=str(tmp_path / "cache"))
    share_big = np.mean([int(train[i]["tokens"][0]) == 1 for i in range(len(train))])
    assert share_big == pytest.approx(0.75, abs=0.01)


def test_mock_corpus_is_deterministic_and_inside_the_vocabulary(tmp_path):
    a = mock_data_prefix(str(tmp_path / "a"), 300, 16, seed=3, eod=300)
    b = mock_data_prefix(str(tmp_path / "b"), 300, 16, seed=3, eod=300)
    da, db = IndexedDataset(a), IndexedDataset(b)
    assert da.num_documents == db.num_documents > 0
    for i in (0, 7, da.num_documents - 1):
        assert np.array_equal(da[i], db[i])
        assert da[i][-1] == 300 and da[i][:-1].max() < 300
        assert 8 <= len(da[i]) - 1 <= 32
    assert mock_data_prefix(str(tmp_path / "a"), 300, 16, seed=3, eod=300) == a
