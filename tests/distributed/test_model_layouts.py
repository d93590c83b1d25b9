"""GPT-, RoBERTa- and T5-MoE on TP, PP, DP, EP and mixed layouts match one process.

What is compared. For each model kind (the tiny stacks of ``layouts.tiny_config``: GPT and
RoBERTa 4 layers, T5 2 + 2; MoE on every 2nd layer, 4 experts, top-2, dropless, aux and z
loss on) and each compression (``none`` and ``lsh`` with L = 3 sign hashes), one training
step of 4 micro-batches in fp32 on a layout of 2 or 4 gloo processes gives the same
per-micro-batch LM loss, the same gradient of every parameter (gathered to full shape by
name over TP and EP, after the DP / expert-DP reduction and the tied-embedding sum) and the
same global grad norm as the single-process model, to rtol 1e-5 / atol 1e-6
(``layouts.compare_with_reference``).

Layouts (tp, pp, dp, ep): TP=2, PP=2, DP=2, EP=2 (dp 2), EP=4 (dp 4), and the mixed
TP2xEP2, TP2xPP2xEP2, PP2xDP2xEP2 and TP2xDP2xEP4; plus TP=2 and TP2xEP2 with sequence
parallelism for GPT and RoBERTa (T5 has none), where the load-balancing loss is off (each TP
rank computes it on its sequence shard, which is not the whole micro-batch's loss).

The GLUE fine-tuning classifier (``gpt-classifier``: the GPT body with a last-token
classification head, right-padded samples, a per-sample cross-entropy) runs under both
compressors on the world-2 layouts, TP2xEP2 with sequence parallelism, EP=4 and TP2xPP2xEP2.

Swin-MoE (``swin``: 16 px images, 2 stages of 2 blocks, windows of 2 patches shifted in the
second block, MoE in blocks 1 and 3, a patch merging between the stages) runs under both
compressors on DP=2 (EP=1), EP=2, EP=4 and EP2xDP2 (4 ranks, experts replicated over 2);
tensor and pipeline parallelism are not implemented for it.

The "modern" GPT jobs (``model_layouts_util.MODERN_MODEL`` / ``MODERN_MOE``: RMSNorm, RoPE,
grouped-query attention, SwiGLU, no biases, untied output, a 0/1 MoE layer pattern,
per-sequence load balancing, sigmoid scores, a separate expert width and a shared expert)
run on TP=2, PP=2, EP=2, TP2xEP2 (also with sequence parallelism), TP2xPP2xEP2 and
PP2xDP2xEP2, under each compressor: none, lsh, and cast with bf16 rows on the layouts
without TP (cast rounds every row the same wherever it is dispatched, so its reference is
the single-process cast model; with TP the rows differ from one process's in the last float
bits, from the other summation order, and bf16 rounding can turn that into one bf16 step).

How LSH equivalence is shown. LSH clusters the rows one rank dispatches, per destination
expert; what rank receives them (EP) does not matter, since rows are clustered before the
all-to-all. With tp = 1 a rank dispatches the rows of whole micro-batches (DP and PP move
whole micro-batches), which is exactly what the single-process model clusters micro-batch
by micro-batch, so these layouts are compared with the unmodified single-process ``lsh``
model: same clusters, same centroids, hence the same loss and gradients. With tp = 2 and no
sequence parallelism the tokens are replicated over TP and LSH is ``tp_shared``: every TP
rank clusters the whole micro-batch identically and sends only its share of the centroids,
so these layouts too are compared with the unmodified single-process model. With sequence
parallelism each TP rank holds (and clusters) its own sequence shard; the reference for those
is the single-process model whose MoE layers dispatch each share separately
(``model_layouts_util.tp_share_reference``). That this is not vacuous is checked too: LSH
merged rows in every ``lsh`` job (rows sent < rows summed over ranks) and none in ``none``
jobs, ``lsh`` changes the single-process loss, and the share split changes the ``lsh``
reference (so a TP layout that clustered the wrong tokens, or a reference that did, would
fail). ``lsh`` with singleton clusters equal to ``none`` exactly
is a single-process test in ``tests/unit/test_models.py``.
"""
from __future__ import annotations

import pytest
import torch

from megatron_lsh.parallel.spawn import run_distributed
from tests.distributed.layouts import compare_with_reference
from tests.distributed.model_layouts_util import (COMPRESSIONS, KINDS, make_jobs,
                                                  make_modern_jobs, run_jobs, tp_share_reference)

# (tp, pp, ep); dp = world / (tp * pp).
WORLD2_LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 1), (1, 1, 2), (2, 1, 2)]
WORLD4_LAYOUTS = [(1, 1, 4), (2, 2, 2), (1, 2, 2), (2, 1, 4)]
WORLD2_JOBS = (make_jobs(2, WORLD2_LAYOUTS)
               + make_jobs(2, [(2, 1, 1), (2, 1, 2)], kinds=("gpt", "roberta"),
                           sequence_parallel=True)
               + make_modern_jobs(2, [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 2)])
               + make_modern_jobs(2, [(2, 1, 2)], sequence_parallel=True))
WORLD2_JOBS += (make_jobs(2, WORLD2_LAYOUTS, kinds=("gpt-classifier",))
                + make_jobs(2, [(2, 1, 2)], kinds=("gpt-classifier",), sequence_parallel=True))
WORLD2_JOBS += make_jobs(2, [(1, 1, 1), (1, 1, 2)], kinds=("swin",))
WORLD4_JOBS = (make_jobs(4, WORLD4_LAYOUTS) + make_modern_jobs(4, [(2, 2, 2), (1, 2, 2)])
               + make_jobs(4, [(1, 1, 4), (2, 2, 2)], kinds=("gpt-classifier",))
               + make_jobs(4, [(1, 1, 4), (1, 1, 2)], kinds=("swin",)))

_references: dict = {}


@pytest.fixture(autouse=True)
def one_thread():
    """References run in this process: one intra-op thread (spinning OpenMP threads on the
    shared 2-core machine make these tiny steps many times slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference_for(job):
    """The single-process reference of a job (cached: several layouts share one)."""
    # LSH is tp_shared: without sequence parallelism TP ranks cluster the whole micro-batch.
    per_share = job["compression"] == "lsh" and job["sequence_parallel"]
    shares = job["tp"] if per_share else 1
    key = (job["kind"], job.get("variant"), job["compression"], job["sequence_parallel"], shares)
    if key not in _references:
        _references[key] = tp_share_reference(job["kind"], job["moe"], shares, job["config"])
    return _references[key]


@pytest.fixture(scope="module")
def world2_results():
    return run_distributed(run_jobs, 2, WORLD2_JOBS, timeout=600)


@pytest.fixture(scope="module")
def world4_results():
    return run_distributed(run_jobs, 4, WORLD4_JOBS, timeout=600)


def check_job(job, per_rank):
    losses, grads, norm = reference_for(job)
    compare_with_reference(per_rank, losses, grads, norm)


@pytest.mark.parametrize("index", range(len(WORLD2_JOBS)), ids=[j["name"] for j in WORLD2_JOBS])
def test_world2_layout_matches_single_process(world2_results, index):
    check_job(WORLD2_JOBS[index], [rank[index] for rank in world2_results])


@pytest.mark.parametrize("index", range(len(WORLD4_JOBS)), ids=[j["name"] for j in WORLD4_JOBS])
def test_world4_layout_matches_single_process(world4_results, index):
    check_job(WORLD4_JOBS[index], [rank[index] for rank in world4_results])


@pytest.mark.parametrize("world", [2, 4])
def test_lsh_merged_rows_and_none_did_not(world, request):
    """Every lsh job sent fewer centroids than rows; every none job sent each row."""
    jobs = WORLD2_JOBS if world == 2 else WORLD4_JOBS
    results = request.getfixturevalue(f"world{world}_results")
    for index, job in enumerate(jobs):
        rows = sum(rank[index]["rows"] for rank in results)
        centroids = sum(rank[index]["sent_rows"] for rank in results)
        assert rows > 0, job["name"]
        if job["compression"] == "lsh":
            assert centroids < rows, (job["name"], centroids, rows)
        else:
            assert centroids == rows, (job["name"], centroids, rows)


@pytest.mark.parametrize("kind", KINDS)
def test_lsh_changes_the_single_process_model(kind):
    """The lsh reference is not the none reference (the lsh comparisons test compression)."""
    lsh_losses = torch.tensor(tp_share_reference(kind, COMPRESSIONS["lsh"], 1)[0])
    none_losses = torch.tensor(tp_share_reference(kind, COMPRESSIONS["none"], 1)[0])
    assert not torch.allclose(lsh_losses, none_losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_tp_share_split_changes_the_lsh_reference(kind):
    """Clustering each TP share separately differs from clustering the whole micro-batch, so
    the TP lsh layouts really check that TP ranks cluster their own share only."""
    _, split_grads, _ = tp_share_reference(kind, COMPRESSIONS["lsh"], 2)
    _, whole_grads, _ = tp_share_reference(kind, COMPRESSIONS["lsh"], 1)
    differs = [n for n in whole_grads
               if not torch.allclose(split_grads[n], whole_grads[n], rtol=1e-5, atol=1e-6)]
    assert differs
