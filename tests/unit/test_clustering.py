"""Exact-count clustering (megatron_lsh.moe.compressors.clustering): counts, numbering, quality.

Every test runs twice: with the compiled split rounds (``_split``, the CPU default) and with
the tensor version (the CUDA path, and the fallback when the extension is not built).
"""
from __future__ import annotations

import os

import pytest
import torch

from megatron_lsh.moe.compressors import clustering
from megatron_lsh.moe.compressors.clustering import (canonical_numbering, cluster_budget,
                                                     cluster_centroids, cluster_to_budget,
                                                     distortion, lloyd_refine, sketch_basis,
                                                     sketch_rows)
from megatron_lsh.moe.text_states import text_states

HAMLET = os.path.join(os.path.dirname(__file__), "..", "fixtures", "moe",
                      "hamlet_act1_scene1.txt")


@pytest.fixture(autouse=True, params=["compiled", "tensor"])
def split_backend(request, monkeypatch):
    """Run the test with the C++ split rounds, then with the tensor version."""
    if request.param == "compiled":
        assert clustering._compiled is not None, "run: python setup.py build_ext --inplace"
    else:
        monkeypatch.setattr(clustering, "_compiled", None)
    return request.param


def sorted_rows(rows_per_expert, hidden=8, seed=0):
    """Random rows grouped by expert: (x [R, H], expert_of_row [R])."""
    gen = torch.Generator().manual_seed(seed)
    expert_R = torch.repeat_interleave(torch.arange(len(rows_per_expert)),
                                       torch.tensor(rows_per_expert))
    return torch.randn(expert_R.numel(), hidden, generator=gen), expert_R


def blobs(seed, num_experts=3, hidden=16):
    """Well separated Gaussian blobs, 1-8 per expert: (x, expert, blob label, blobs per expert)."""
    gen = torch.Generator().manual_seed(seed)
    xs, experts, labels, blobs_E = [], [], [], []
    for e in range(num_experts):
        k = int(torch.randint(1, 9, (1,), generator=gen))
        blobs_E.append(k)
        for _ in range(k):
            n = int(torch.randint(3, 40, (1,), generator=gen))
            center = 10 * torch.randn(hidden, generator=gen)
            xs.append(center + 0.01 * torch.randn(n, hidden, generator=gen))
            experts.append(torch.full((n,), e))
            labels.append(torch.full((n,), len(labels)))
    return torch.cat(xs), torch.cat(experts), torch.cat(labels), torch.tensor(blobs_E)


def sse(x, cluster_R, count_C):
    """Sum of squared distances of the rows to their cluster means."""
    return distortion(x, cluster_R, cluster_centroids(x, cluster_R, count_C.numel()))["sse"]


def check_partition(result, expert_R, want_E):
    """Exact counts, non-empty clusters within one expert, canonical numbering."""
    cluster_R, count_C, per_expert_E = result
    assert per_expert_E.tolist() == want_E.tolist()
    assert count_C.numel() == int(want_E.sum())
    assert int(count_C.sum()) == expert_R.numel()
    assert bool((count_C >= 1).all())
    assert torch.equal(torch.bincount(cluster_R, minlength=count_C.numel()), count_C)
    first_seen = list(dict.fromkeys(cluster_R.tolist()))
    assert first_seen == list(range(count_C.numel()))      # numbered by first row
    for c in range(count_C.numel()):
        assert len(set(expert_R[cluster_R == c].tolist())) == 1
    ids = cluster_R.tolist()
    expert_C = expert_R[[ids.index(c) for c in range(count_C.numel())]]
    assert torch.equal(torch.bincount(expert_C, minlength=want_E.numel()), per_expert_E)


def test_cluster_budget():
    rows_E = torch.tensor([0, 1, 10, 101, 7])
    assert cluster_budget(rows_E, 0.1).tolist() == [0, 1, 1, 11, 1]
    assert cluster_budget(rows_E, 0.5).tolist() == [0, 1, 5, 51, 4]
    assert cluster_budget(rows_E, 2.0).tolist() == rows_E.tolist()


@pytest.mark.parametrize("options", [{}, {"lloyd_iters": 1}, {"sketch_dim": 3},
                                     {"split_fraction": 1.0, "sse_ratio": 0.0},
                                     {"power_iters": 0, "refine_iters": 0}])
def test_exact_counts_for_many_budgets(options):
    rows = [17, 0, 40, 1, 25, 3]
    x, expert_R = sorted_rows(rows)
    rows_E = torch.tensor(rows)
    for budget in ([1, 1, 1, 1, 1, 1], [2, 5, 3, 1, 24, 3], [17, 1, 39, 4, 26, 3],
                   [5, 1, 40, 1, 7, 2], [100] * 6):
        budget_E = torch.tensor(budget)
        result = cluster_to_budget(x, expert_R, budget_E, **options)
        check_partition(result, expert_R, torch.minimum(budget_E, rows_E))


def test_budget_at_least_rows_is_the_identity_even_with_duplicates():
    x, expert_R = sorted_rows([6, 9, 4], seed=1)
    x[7:12] = x[7]                                   # five identical rows of expert 1
    x[13:15] = x[13]                                 # two identical rows of expert 2
    cluster_R, count_C, per_expert_E = cluster_to_budget(x, expert_R, torch.tensor([6, 9, 50]))
    assert torch.equal(cluster_R, torch.arange(19))
    assert count_C.tolist() == [1] * 19 and per_expert_E.tolist() == [6, 9, 4]


def test_duplicates_are_cut_only_when_needed():
    x, expert_R = sorted_rows([12], seed=2)
    x[:8] = x[0]                                     # 8 identical rows, 4 distinct ones
    for budget in range(1, 13):
        result = cluster_to_budget(x, expert_R, torch.tensor([budget]))
        check_partition(result, expert_R, torch.tensor([budget]))
        if budget <= 5:                              # the duplicates stay together
            assert len(set(result[0][:8].tolist())) == 1
        assert sse(x, result[0], result[1]) <= 1e-6 or budget < 5


def test_budget_one_is_one_cluster_per_expert():
    rows = [5, 0, 7, 2]
    x, expert_R = sorted_rows(rows)
    cluster_R, count_C, per_expert_E = cluster_to_budget(x, expert_R, torch.tensor([1, 1, 1, 1]))
    assert cluster_R.tolist() == [0] * 5 + [1] * 7 + [2] * 2
    assert count_C.tolist() == [5, 7, 2] and per_expert_E.tolist() == [1, 0, 1, 1]


def test_no_rows_and_empty_experts():
    x = torch.zeros(0, 8)
    cluster_R, count_C, per_expert_E = cluster_to_budget(
        x, torch.zeros(0, dtype=torch.int64), torch.tensor([3, 0, 2]), lloyd_iters=2)
    assert cluster_R.numel() == 0 and count_C.numel() == 0
    assert per_expert_E.tolist() == [0, 0, 0]
    x, expert_R = sorted_rows([0, 0, 9, 0])
    result = cluster_to_budget(x, expert_R, torch.tensor([0, 4, 4, 0]))
    check_partition(result, expert_R, torch.tensor([0, 0, 4, 0]))


def test_bad_inputs_are_refused():
    x, expert_R = sorted_rows([3, 4])
    with pytest.raises(ValueError, match="sorted"):
        cluster_to_budget(x, expert_R.flip(0), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="at least one"):
        cluster_to_budget(x, expert_R, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="spans"):
        cluster_to_budget(x, expert_R, torch.tensor([2, 2]),
                          init_cluster_of_row_R=torch.tensor([0, 0, 1, 1, 2, 2, 2]))


def test_bf16_input_clusters_its_own_values_in_fp32():
    x, expert_R = sorted_rows([30, 50], hidden=16, seed=3)
    x_bf16 = x.to(torch.bfloat16)
    budget_E = torch.tensor([7, 11])
    result = cluster_to_budget(x_bf16, expert_R, budget_E, lloyd_iters=1)
    check_partition(result, expert_R, budget_E)
    again = cluster_to_budget(x_bf16.float(), expert_R, budget_E, lloyd_iters=1)
    assert all(torch.equal(a, b) for a, b in zip(result, again))


def test_deterministic():
    x, expert_R = sorted_rows([60, 45, 80], hidden=12, seed=4)
    budget_E = torch.tensor([9, 4, 17])
    init_R = (x[:, 0] > 0).long() + 2 * expert_R
    for options in ({}, {"lloyd_iters": 2}, {"init_cluster_of_row_R": init_R},
                    {"sketch_dim": 4}):
        first = cluster_to_budget(x, expert_R, budget_E, **options)
        second = cluster_to_budget(x.clone(), expert_R.clone(), budget_E.clone(), **options)
        assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("options", [{}, {"lloyd_iters": 2}, {"sketch_dim": 8}])
def test_gaussian_blobs_are_recovered_exactly(options):
    for seed in range(6):
        x, expert_R, label_R, blobs_E = blobs(seed)
        cluster_R, count_C, _ = cluster_to_budget(x, expert_R, blobs_E, **options)
        assert torch.equal(cluster_R, canonical_numbering(label_R, expert_R, 3)[0])
        stats = distortion(x, cluster_R, cluster_centroids(x, cluster_R, count_C.numel()))
        assert stats["rel_residual"] < 1e-5 and stats["mean_cos"] > 0.9999


def test_sse_falls_with_the_budget():
    x, expert_R, _, blobs_E = blobs(7)
    assert int(blobs_E.max()) <= 8
    sses = [sse(x, *cluster_to_budget(x, expert_R, torch.full((3,), b))[:2]) for b in range(1, 10)]
    assert all(a >= b for a, b in zip(sses, sses[1:]))
    assert sses[0] > 1e5 * sses[-1]                   # 8 per expert: at most noise is left
    # Real contextual hidden states, one expert.
    with open(HAMLET, encoding="utf-8") as f:
        states = text_states(f.read(), 32, num_tokens=600)
    expert_R = torch.zeros(600, dtype=torch.int64)
    prev = float("inf")
    for rate in (0.02, 0.05, 0.1, 0.2, 0.5):
        result = cluster_to_budget(states, expert_R, cluster_budget(torch.tensor([600]), rate))
        now = sse(states, result[0], result[1])
        assert now < prev
        prev = now


def test_lloyd_never_increases_sse_and_keeps_counts():
    x, expert_R = sorted_rows([70, 0, 90, 55], hidden=10, seed=5)
    budget_E = torch.tensor([8, 3, 12, 5])
    want_E = torch.tensor([8, 0, 12, 5])
    start = cluster_to_budget(x, expert_R, budget_E)
    # A poor partition with the same counts: consecutive rows of each expert in chunks.
    rows_E = torch.bincount(expert_R, minlength=4)
    pos_R = torch.arange(expert_R.numel()) - (torch.cumsum(rows_E, 0) - rows_E)[expert_R]
    chunk_R = pos_R * want_E[expert_R] // rows_E[expert_R]
    poor = canonical_numbering(expert_R * 1000 + chunk_R, expert_R, 4)
    check_partition(poor, expert_R, want_E)
    for partition in (start, poor):
        before = sse(x, partition[0], partition[1])
        for sketch_dim in (None, 3):
            prev = before
            for iters in (1, 2, 3):
                result = lloyd_refine(x, expert_R, partition[0], 4, iters, sketch_dim=sketch_dim)
                check_partition(result, expert_R, want_E)
                now = sse(x, result[0], result[1])
                assert now <= prev * (1 + 1e-6)
                prev = now
    assert sse(x, *lloyd_refine(x, expert_R, poor[0], 4, 3)[:2]) < 0.9 * sse(x, *poor[:2])


def test_lloyd_keeps_a_cluster_all_of_whose_rows_prefer_others():
    # Cluster 0 = {-10, 10} (centroid 0); its rows sit on the centroids of clusters 1 and 2.
    x = torch.tensor([[-10.0, 0.0], [10.0, 0.0], [-9.0, 0.0], [-11.0, 0.0], [9.0, 0.0],
                      [11.0, 0.0]])
    expert_R = torch.zeros(6, dtype=torch.int64)
    cluster_R, count_C, per_expert_E = lloyd_refine(x, expert_R, torch.tensor([0, 0, 1, 1, 2, 2]),
                                                    1, iters=3)
    assert per_expert_E.tolist() == [3] and bool((count_C >= 1).all())
    assert cluster_R.tolist() == [0, 1, 2, 2, 1, 1]  # the anchor (row 0) stays, row 1 moves


def test_initial_partition_is_refined_or_replaced():
    x, expert_R = sorted_rows([40, 30], hidden=6, seed=6)
    budget_E = torch.tensor([10, 5])
    # Under the budget: every final cluster lies inside one initial cluster.
    init_R = 2 * expert_R + (x[:, 0] > 0).long()
    cluster_R, count_C, per_expert_E = cluster_to_budget(x, expert_R, budget_E,
                                                         init_cluster_of_row_R=init_R)
    check_partition((cluster_R, count_C, per_expert_E), expert_R, budget_E)
    for c in range(count_C.numel()):
        assert len(set(init_R[cluster_R == c].tolist())) == 1
    # Over the budget (every row its own cluster in expert 0; 8 buckets in expert 1).
    init_R = torch.cat([torch.arange(40), 100 + torch.arange(30) % 8])
    result = cluster_to_budget(x, expert_R, budget_E, init_cluster_of_row_R=init_R)
    check_partition(result, expert_R, budget_E)


def test_adversarial_geometric_line_reaches_every_count():
    # Rows 2^i along one axis: a cut along the axis peels off the largest row only.
    x = torch.zeros(40, 3)
    x[:, 0] = 2.0 ** torch.arange(40)
    expert_R = torch.zeros(40, dtype=torch.int64)
    for budget in (3, 20, 40):
        result = cluster_to_budget(x, expert_R, torch.tensor([budget]))
        check_partition(result, expert_R, torch.tensor([budget]))


def test_centroids_distortion_and_sketch():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    cluster_R = torch.tensor([0, 0, 1, 1])
    centroids = cluster_centroids(x, cluster_R, 2)
    assert torch.allclose(centroids, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    stats = distortion(x, cluster_R, centroids)
    assert stats["sse"] == pytest.approx(2.0 + 8.0)
    assert stats["rel_residual"] == pytest.approx(10.0 / 18.0)
    assert stats["mean_cos"] == pytest.approx(0.5)       # cos 1, 1 and 0 (zero centroid), 0
    own = distortion(x, torch.arange(4), x)
    assert own["rel_residual"] == 0.0 and own["mean_cos"] == pytest.approx(1.0)
    rows = torch.randn(50, 64, generator=torch.Generator().manual_seed(8))
    sketch = sketch_rows(rows, 16)
    assert sketch.shape == (50, 16) and torch.equal(sketch, sketch_rows(rows, 16))
    assert sketch.norm() < rows.norm()                    # an orthonormal projection
    assert torch.equal(sketch_rows(rows, 64), rows)


def test_precomputed_search_space_gives_the_same_partition():
    """Sketching the tokens and gathering to rows is the same search as sketching the rows."""
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(120, 192, generator=gen)
    token_of_row = torch.randint(0, 120, (300,), generator=gen)
    expert_R = torch.sort(torch.randint(0, 3, (300,), generator=gen)).values
    rows = tokens[token_of_row]
    budget = torch.tensor([9, 7, 12])
    search = (tokens @ sketch_basis(192, 32)).index_select(0, token_of_row)
    assert torch.allclose(search, sketch_rows(rows, 32), atol=1e-5)
    own = cluster_to_budget(rows, expert_R, budget, sketch_dim=32)
    given = cluster_to_budget(None, expert_R, budget, search_RD=sketch_rows(rows, 32))
    for a, b in zip(own, given):
        assert torch.equal(a, b)
    # Lloyd passes check moves in H dims: they need the rows themselves.
    with pytest.raises(ValueError, match="None only"):
        cluster_to_budget(None, expert_R, budget, search_RD=search, lloyd_iters=1)
    with pytest.raises(ValueError, match="search_RD has 299 rows"):
        cluster_to_budget(rows, expert_R, budget, search_RD=search[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_counts_and_repeatability():
    x, expert_R = sorted_rows([300, 0, 500], hidden=32, seed=9)
    budget_E = torch.tensor([30, 2, 64])
    torch.use_deterministic_algorithms(True)
    try:
        first = cluster_to_budget(x.cuda(), expert_R.cuda(), budget_E, lloyd_iters=2)
        second = cluster_to_budget(x.cuda(), expert_R.cuda(), budget_E, lloyd_iters=2)
    finally:
        torch.use_deterministic_algorithms(False)
    check_partition(tuple(t.cpu() for t in first), expert_R, torch.tensor([30, 0, 64]))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
