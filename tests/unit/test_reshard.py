"""Resharding pieces: TP / EP splits invert exactly, and a checkpoint of another model is one
sentence (missing tensor, extra tensor, other shape). Whole layouts are resharded end to end
in ``tests/e2e/test_reshard.py``."""
from __future__ import annotations

import pytest
import torch

from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.layers import shard_master_weight
from megatron_lsh.training.checkpointing import (CheckpointError, load_checkpoint,
                                                 parallel_layout, save_checkpoint)
from megatron_lsh.training.reshard import Resharder, TensorSpec, parse_position

SINGLE = ProcessGroups.single()


def _tensor(shape, **attrs):
    t = torch.randn(*shape)
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


@pytest.mark.parametrize("stride", [1, 2])
def test_tp_pieces_rebuild_the_full_tensor(stride):
    full = torch.randn(8, 3)
    spec = TensorSpec(_tensor((4, 3), tensor_model_parallel=True, partition_dim=0,
                              partition_stride=stride))
    pieces = {(r, 0): shard_master_weight(full, 0, 2, r, stride) for r in range(2)}
    assert torch.equal(spec.full(pieces, "w", tp_size=2, ep_size=1), full)


def test_expert_pieces_concatenate_in_ep_order_from_any_tp_rank():
    # tp 2 x ep 2 over 2 ranks per stage: positions (tp0, ep0) and (tp1, ep1) only.
    full = torch.randn(4, 5)
    spec = TensorSpec(_tensor((2, 5), is_expert=True))
    pieces = {(0, 0): full[:2], (1, 1): full[2:]}
    assert torch.equal(spec.full(pieces, "experts", tp_size=2, ep_size=2), full)
    with pytest.raises(CheckpointError, match="^the checkpoint has no shard of 'experts' at ep "
                                              "rank 1$"):
        spec.full({(0, 0): full[:2]}, "experts", tp_size=1, ep_size=2)


def test_position_names():
    two = {"pipeline_model_parallel_size": 2, "expert_model_parallel_size": 4}
    assert parse_position("mp_rank_01_001_003", two) == (1, 1, 3)
    assert parse_position("mp_rank_01", {}) == (1, 0, 0)
    assert parse_position("mp_rank_01_002", {"expert_model_parallel_size": 4}) == (1, 0, 2)
    assert parse_position("mp_rank_01_002", {}) is None
    assert parse_position("latest", two) is None


class Small(torch.nn.Module):
    def __init__(self, extra=False, wide=False):
        super().__init__()
        self.a = torch.nn.Linear(3, 6 if wide else 4)
        if extra:
            self.b = torch.nn.Linear(4, 2)


def _resharder(tmp_path, model):
    """A checkpoint of ``model`` saved as if by two DP ranks: loading it here reshards."""
    layout = dict(parallel_layout(SINGLE), data_parallel_size=2)
    save_checkpoint(1, {"model": model.state_dict(), "iteration": 1, "consumed_samples": 4},
                    str(tmp_path), SINGLE, layout=layout)
    _, state = load_checkpoint(str(tmp_path), SINGLE, expected_layout=parallel_layout(SINGLE))
    return Resharder(state["reshard_from"], SINGLE)


def test_same_model_loads_every_tensor(tmp_path):
    saved, target = Small(), Small()
    _resharder(tmp_path, saved).load_model(target)
    for (name, a), (_, b) in zip(saved.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("target, message", [
    (Small(extra=True), r"has no tensor 'b.weight' \(was it saved from another model\?\)$"),
    (Small(wide=True), r"checkpoint tensor 'a.weight' has shape \(4, 3\) in this layout, the "
                       r"model needs \(6, 3\): it was saved from another model$"),
])
def test_another_model_is_one_sentence(tmp_path, target, message):
    with pytest.raises(CheckpointError, match=message):
        _resharder(tmp_path, Small()).load_model(target)


def test_tensors_the_model_lacks_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"holds 2 tensors this model does not have, e.g. "
                                              r"'b.bias': it was saved from another model$"):
        _resharder(tmp_path, Small(extra=True)).load_model(Small())
