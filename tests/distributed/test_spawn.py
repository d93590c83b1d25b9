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


_KEPT = []


def _keeps_a_group(rank, world):
    _KEPT.append(dist.new_group(list(range(world))))   # alive past destroy_process_group
    return rank


def _trains_with_ddp_and_zero1(rank, world):
    # DDP hooks, the collective-support probe and the first torch.optim optimizer (which
    # imports torch._dynamo, which imports torch.distributed.nn) each once kept a process
    # group alive past destroy_process_group.
    from tests.distributed.test_optimizer import STEPS, _zero_setup, _zero_steps
    from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups
    groups = ProcessGroups.build(ParallelDims(world, ep=1))
    _, ddp, opt = _zero_setup(groups, 1)
    norms, _ = _zero_steps(ddp, opt, groups, 0, STEPS)
    return len(norms)


def _imports_dynamo_after_init(rank, world):
    # torch._dynamo imports torch.distributed.nn, whose functions default to group.WORLD as
    # it is at import time: imported with a group alive, they would keep it past destroy.
    import torch._dynamo  # noqa: F401
    import torch.distributed.nn.functional as functional
    assert functional.all_reduce.__defaults__[-1] is None   # imported before the group
    return rank


def test_importing_dynamo_inside_a_worker_leaves_no_process_group_behind():
    assert run_distributed(_imports_dynamo_after_init, 2, timeout=120) == [0, 1]


def test_a_group_outliving_destroy_is_an_error():
    with pytest.raises(WorkerError, match=r"gloo threads .* still run after "
                                          r"destroy_process_group"):
        run_distributed(_keeps_a_group, 2, timeout=60)


def test_training_leaves_no_process_group_behind():
    # The worker fails if any gloo thread survives destroy_process_group: such a group is torn
    # down during interpreter shutdown, where gloo can abort a worker that already reported ok.
    from tests.distributed.test_optimizer import STEPS
    assert run_distributed(_trains_with_ddp_and_zero1, 2, timeout=120) == [STEPS, STEPS]
