"""The compiled split rounds (``clustering._compiled``) against the tensor version."""
from __future__ import annotations

import pytest
import torch

from megatron_lsh.moe.compressors import clustering
from megatron_lsh.moe.compressors.clustering import cluster_budget, cluster_to_budget
from megatron_lsh.moe.text_states import text_states
from tests.unit.test_clustering import HAMLET, blobs, check_partition, sorted_rows, sse


def test_extension_is_built():
    assert clustering._compiled is not None, "run: python setup.py build_ext --inplace"


def _both_paths(*args, **kwargs):
    """(compiled, tensor) results of one cluster_to_budget call."""
    compiled = cluster_to_budget(*args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clustering, "_compiled", None)
        return compiled, cluster_to_budget(*args, **kwargs)


def test_compiled_split_rounds_match_the_tensor_version():
    # Well separated or small random data: no row sits near a cut, so the partitions agree.
    x, expert_R = sorted_rows([60, 0, 45, 80, 1], hidden=12, seed=11)
    budget_E = torch.tensor([9, 1, 4, 17, 1])
    init_R = (x[:, 0] > 0).long() + 2 * expert_R
    for options in ({}, {"split_fraction": 1.0, "sse_ratio": 0.0},
                    {"power_iters": 0, "refine_iters": 0}, {"power_iters": 3, "refine_iters": 2},
                    {"init_cluster_of_row_R": init_R}, {"lloyd_iters": 1}):
        compiled, tensor = _both_paths(x, expert_R, budget_E, **options)
        assert all(torch.equal(a, b) for a, b in zip(compiled, tensor)), options
    for seed in range(3):
        bx, b_expert_R, _, blobs_E = blobs(seed)
        compiled, tensor = _both_paths(bx, b_expert_R, blobs_E + 2)
        assert all(torch.equal(a, b) for a, b in zip(compiled, tensor))
    # Real hidden states: fp32 vs double sums may flip a row that sits on a cut, so the
    # partitions are compared by their counts and distortion.
    with open(HAMLET, encoding="utf-8") as f:
        states = text_states(f.read(), 64, num_tokens=600)
    s_expert_R = torch.sort(torch.arange(600) % 4).values
    for rate in (0.05, 0.2):
        budget = cluster_budget(torch.bincount(s_expert_R, minlength=4), rate)
        compiled, tensor = _both_paths(states, s_expert_R, budget, sketch_dim=16)
        check_partition(compiled, s_expert_R, budget)
        assert torch.equal(compiled[2], tensor[2])
        assert sse(states, *compiled[:2]) == pytest.approx(sse(states, *tensor[:2]), rel=0.01)


def test_compiled_split_rounds_refuse_bad_ids():
    x = torch.zeros(4, 2)
    expert_R = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="out of range"):
        clustering._compiled.split_rounds(x.numpy(), expert_R.numpy(),
                                          torch.tensor([0, 0, 1, 1]).numpy(),
                                          torch.tensor([2]).numpy(), 1, 1, 0.5, 0.25)
    with pytest.raises(ValueError, match="dense"):
        clustering._compiled.split_rounds(x.numpy(), expert_R.numpy(),
                                          torch.tensor([0, 0, 2, 2]).numpy(),
                                          torch.tensor([2, 2]).numpy(), 1, 1, 0.5, 0.25)
