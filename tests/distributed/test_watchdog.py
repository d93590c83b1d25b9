"""The collective watchdog names the ranks a failed collective waited for (heartbeats)."""
import torch.distributed as dist

from megatron_lsh.parallel.spawn import run_distributed
from megatron_lsh.training.watchdog import CollectiveWatchdog, is_collective_failure


def _phases(rank, world):
    dog = CollectiveWatchdog(0.1)
    phases = ["forward-backward", "gradient all-reduce", "optimizer step"]
    for name in phases[:2 if rank == 2 else 3]:      # rank 2 falls behind
        with dog.phase(name, 7):
            pass
    dist.barrier()
    timed_out = dog.explain(RuntimeError("[gloo] Timed out waiting 6000ms for recv operation"))
    lost = dog.explain(RuntimeError("Connection closed by peer [10.0.0.2]:4141"))
    return timed_out, lost


def test_the_ranks_behind_are_named_and_the_lowest_healthy_rank_speaks():
    results = run_distributed(_phases, 3, timeout=60)
    timed_out, lost = results[0]
    assert timed_out == ("the optimizer step of iteration 7 timed out after 6 s: rank 2 did not "
                         "reach it (rank 2 last seen in gradient all-reduce of iteration 7)", 0)
    assert lost[0].startswith("the optimizer step of iteration 7 lost a peer (Connection closed "
                              "by peer [10.0.0.2]:4141): rank 2 did not reach it")
    assert results[1][0] == timed_out                  # every healthy rank says the same
    assert results[2][0][0] == ("the gradient all-reduce of iteration 7 timed out after 6 s; "
                                "every rank had entered it, so one stopped inside it (the "
                                "heartbeats cannot tell which)")


def test_backend_failures_are_recognised_and_other_errors_are_not():
    assert is_collective_failure(RuntimeError("Timed out waiting 60000ms for recv operation"))
    assert is_collective_failure(RuntimeError("Connection closed by peer [127.0.0.1]:1234"))
    assert not is_collective_failure(RuntimeError("shape mismatch: [2, 3] vs [3, 2]"))
    assert not is_collective_failure(ValueError("Timed out"))
