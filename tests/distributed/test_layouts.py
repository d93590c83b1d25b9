"""Every parallel layout with world size <= 4 gives the single-process loss and gradients.

The stack is the tiny dense GPT (4 layers, 4 heads) built from the parallel layers; one
training step of 4 micro-batches, fp32, rtol 1e-5. Gradients are gathered to full shape by
name; the grad norm (counting every parameter once across TP, PP and DP) must match too.
"""
import pytest

from megatron_lsh.config import MoEConfig
from megatron_lsh.parallel.spawn import run_distributed
from tests.distributed.layouts import (compare_with_reference, parallel_step_worker,
                                       reference_step, tiny_config)

LAYOUTS = [(tp, pp, dp) for tp in (1, 2, 4) for pp in (1, 2, 4) for dp in (1, 2, 4)
           if tp * pp * dp in (2, 4)]


@pytest.fixture(scope="module")
def dense_reference():
    config = tiny_config("gpt")
    return config, reference_step("gpt", config, MoEConfig())


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS, ids=[f"tp{t}-pp{p}-dp{d}" for t, p, d in LAYOUTS])
def test_dense_gpt_layout_matches_single_process(dense_reference, tp, pp, dp):
    config, (losses, grads, norm) = dense_reference
    results = run_distributed(parallel_step_worker, tp * pp * dp, "gpt", config, MoEConfig(),
                              tp, pp, 1, timeout=240)
    assert len(results) == tp * pp * dp
    compare_with_reference(results, losses, grads, norm)


def test_sequence_parallel_matches_single_process(dense_reference):
    config, (losses, grads, norm) = dense_reference
    results = run_distributed(parallel_step_worker, 4, "gpt", config, MoEConfig(), 2, 2, 1,
                              True, timeout=240)
    assert sum(r["last"] for r in results) == 2  # both TP ranks of the last stage report
    compare_with_reference(results, losses, grads, norm)


def test_all_forward_all_backward_schedule(dense_reference):
    config, (losses, grads, norm) = dense_reference
    results = run_distributed(parallel_step_worker, 4, "gpt", config, MoEConfig(), 1, 4, 1,
                              False, "afab", timeout=240)
    assert [r["last"] for r in results] == [False, False, False, True]
    compare_with_reference(results, losses, grads, norm)
