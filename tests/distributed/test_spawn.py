"""The multi-process harness itself: results come back, failures and hangs become errors."""
import time

import pytest
import torch
import torch.distributed as dist

from megatron_lsh.parallel.spawn import WorkerError, run_distributed


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank, t.item()


def _one_rank_raises(rank, world):
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()


def _one_rank_hangs(rank, world):
    if rank == 1:
        time.sleep(120)  # a stuck rank: rank 0 waits for it in the barrier
    dist.barrier()
    return rank


def test_results_come_back_in_rank_order():
    assert run_distributed(_sum_ranks, 3, timeout=60) == [(0, 3.0), (1, 3.0), (2, 3.0)]


def test_failure_reports_the_failing_rank():
    with pytest.raises(WorkerError, match=r"(?s)rank 1 of 2 failed.*rank one is broken"):
        run_distributed(_one_rank_raises, 2, timeout=60)


def test_hang_becomes_a_timeout():
    with pytest.raises(WorkerError, match=r"ranks \[0, 1\] of 2 did not finish within 5 s"):
        run_distributed(_one_rank_hangs, 2, timeout=5)
