"""Bucketed DP gradient reduction on gloo against a single-process reference on the whole batch.

The model has dense layers and one expert tensor (``is_expert``): rank ``r`` holds expert
``ep_rank(r)`` and uses it on its own micro-batch; the reference holds all experts and uses
expert ``ep_rank(r)`` on shard ``r``. So the reference gradient of expert ``e`` is the mean-loss
gradient over the shards of the ranks holding ``e``: exactly what a reduction over the
expert-DP group (scaled by 1/dp) gives, and what a reduction over DP would get wrong.
"""
import pytest
import torch
import torch.nn as nn

from megatron_lsh.parallel.data_parallel import DistributedDataParallel
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups
from megatron_lsh.parallel.spawn import run_distributed

H, IN, OUT, MB = 8, 6, 3, 4  # hidden, input, output widths; samples per rank and micro-batch


class TinyMoE(nn.Module):
    """Dense layers around a residual "expert" matmul; ``experts`` is marked ``is_expert``."""

    def __init__(self, num_experts: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(IN, H)
        self.norm = nn.LayerNorm(H)
        self.fc2 = nn.Linear(H, OUT)
        self.experts = nn.Parameter(torch.randn(num_experts, H, H) * 0.3)
        self.experts.is_expert = True

    def forward(self, x, expert: int):
        h = torch.tanh(self.fc1(x))
        h = h + torch.tanh(h @ self.experts[expert])
        return self.fc2(self.norm(h))


def local_model(reference: TinyMoE, ep_rank: int) -> TinyMoE:
    """This rank's copy: the dense weights and its one expert."""
    model = TinyMoE(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = dict(reference.named_parameters())[name]
            p.copy_(src[ep_rank:ep_rank + 1] if name == "experts" else src)
    return model


def batch(dp: int, micro_batches: int = 1, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    n = dp * MB * micro_batches
    return torch.randn(n, IN, generator=g), torch.randn(n, OUT, generator=g)


def reference_grads(dp: int, ep: int, micro_batches: int = 1) -> dict:
    """Single process, whole batch: mean loss over all samples, shard r through expert r % ep."""
    model = TinyMoE(ep)
    x, y = batch(dp, micro_batches)
    per_rank = MB * micro_batches
    loss = sum(nn.functional.mse_loss(model(x[r * per_rank:(r + 1) * per_rank], r % ep),
                                      y[r * per_rank:(r + 1) * per_rank]) for r in range(dp)) / dp
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _grads(model) -> dict:
    return {n: p.main_grad.clone() for n, p in model.named_parameters()}


def _moe_worker(rank, world_size, ep):
    dims = ParallelDims(world_size, ep=ep)
    groups = ProcessGroups.build(dims)
    model = local_model(TinyMoE(ep), groups.ep_rank)
    # A tiny bucket size: several buckets per buffer, launched one by one from the hooks.
    ddp = DistributedDataParallel(model, groups, bucket_size_mb=30 * 4 / 2 ** 20)
    # broadcast_params: dense weights from DP rank 0, experts from expert-DP rank 0.
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (groups.expert_dp_rank if name == "experts" else groups.dp_rank) != 0:
                p.add_(1.0)
    ddp.broadcast_params()
    out = {"ep_rank": groups.ep_rank,
           "broadcast_restored": all(torch.equal(p, reference[n])
                                     for n, p in model.named_parameters()),
           "buckets": {b.is_expert: len(b.buckets) for b in ddp.buffers},
           "group_sizes": {b.is_expert: b.group_size for b in ddp.buffers}}

    # 1. One micro-batch per rank.
    x, y = batch(dims.dp)
    mine = slice(groups.dp_rank * MB, (groups.dp_rank + 1) * MB)
    nn.functional.mse_loss(ddp(x[mine], 0), y[mine]).backward()
    out["launched_during_backward"] = ddp.stats["bucket_launches"]
    ddp.finish_grad_sync()
    out["one_batch"] = _grads(model)

    # 2. Two micro-batches: the first under no_sync (no communication at all).
    ddp.zero_grad_buffer()
    x, y = batch(dims.dp, micro_batches=2)
    start = dict(ddp.stats)
    for m in range(2):
        rows = slice((groups.dp_rank * 2 + m) * MB, (groups.dp_rank * 2 + m + 1) * MB)
        if m == 0:
            with ddp.no_sync():
                (nn.functional.mse_loss(ddp(x[rows], 0), y[rows]) / 2).backward()
            out["after_first"] = {k: ddp.stats[k] - start[k] for k in start}
        else:
            (nn.functional.mse_loss(ddp(x[rows], 0), y[rows]) / 2).backward()
    ddp.finish_grad_sync()
    out["after_step"] = {k: ddp.stats[k] - start[k] for k in start}
    out["two_batches"] = _grads(model)
    return out


def _world4_worker(rank, world_size):
    # Both 4-process scenarios in one launch: starting processes is most of a test's time.
    return {"moe": _moe_worker(rank, world_size, 2), "sp": _sp_worker(rank, world_size, 2)}


@pytest.fixture(scope="module")
def world4():
    return run_distributed(_world4_worker, 4, timeout=180)


@pytest.mark.parametrize("dp, ep", [(2, 2), (4, 2)])
def test_bucketed_allreduce_matches_single_process(dp, ep, request):
    if dp == 4:
        results = [r["moe"] for r in request.getfixturevalue("world4")]
    else:
        results = run_distributed(_moe_worker, dp, ep, timeout=120)
    ref_one = reference_grads(dp, ep)
    ref_two = reference_grads(dp, ep, micro_batches=2)
    for r, res in enumerate(results):
        e = res["ep_rank"]
        assert e == r % ep
        assert res["broadcast_restored"]
        assert res["group_sizes"] == {False: dp, True: dp // ep}   # experts: expert-DP only
        n_buckets = sum(res["buckets"].values())
        assert res["buckets"][False] > 1
        assert res["launched_during_backward"] == n_buckets           # all launched by hooks
        for key, ref in (("one_batch", ref_one), ("two_batches", ref_two)):
            for name, grad in res[key].items():
                expected = ref[name][e:e + 1] if name == "experts" else ref[name]
                torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7,
                                           msg=f"rank {r} {key} {name}")
        # no_sync: nothing launched on the first micro-batch, every bucket once on the last.
        assert res["after_first"] == {"bucket_launches": 0, "collectives": 0}
        expected_collectives = sum(n for is_expert, n in res["buckets"].items()
                                   if (dp // ep if is_expert else dp) > 1)
        assert res["after_step"] == {"bucket_launches": n_buckets,
                                     "collectives": expected_collectives}
    # Different ep ranks hold different experts, so their reduced gradients differ.
    assert not torch.allclose(results[0]["one_batch"]["experts"],
                              results[1]["one_batch"]["experts"])


S = 6  # sequence length (split over the TP ranks by sequence parallelism)


class SequenceParallelModel(nn.Module):
    """A norm weight used on this TP rank's part of the sequence (``sequence_parallel``) and a
    per-TP-rank scale (``tensor_model_parallel``: rank t holds row t of the reference)."""

    def __init__(self, rows: int):
        super().__init__()
        torch.manual_seed(5)
        self.norm_weight = nn.Parameter(1 + 0.1 * torch.randn(H))
        self.scale = nn.Parameter(torch.randn(rows, H))
        self.norm_weight.sequence_parallel = True
        self.scale.tensor_model_parallel = True

    def forward(self, x, row: int):
        # Loss contribution of this part of the sequence, normalised by the full token count.
        out = nn.functional.layer_norm(x, (H,), self.norm_weight) * self.scale[row]
        return out


def _sp_loss(out, y):
    return ((out - y) ** 2).sum() / (y.shape[0] * S * H)


def _sp_data(dp):
    g = torch.Generator().manual_seed(11)
    return torch.randn(dp, 2, S, H, generator=g), torch.randn(dp, 2, S, H, generator=g)


def _sp_worker(rank, world_size, tp):
    groups = ProcessGroups.build(ParallelDims(world_size, tp=tp))
    ref = SequenceParallelModel(tp)
    model = SequenceParallelModel(1)
    with torch.no_grad():
        model.scale.copy_(ref.scale[groups.tp_rank:groups.tp_rank + 1])
    ddp = DistributedDataParallel(model, groups)
    x, y = _sp_data(groups.dp_size)
    part = slice(groups.tp_rank * S // tp, (groups.tp_rank + 1) * S // tp)
    _sp_loss(ddp(x[groups.dp_rank][:, part], 0), y[groups.dp_rank][:, part]).backward()
    launched_in_backward = ddp.stats["bucket_launches"]
    ddp.finish_grad_sync()
    return {"tp_rank": groups.tp_rank, "grads": _grads(model),
            "sp_buffers": [b.sequence_parallel for b in ddp.buffers],
            "launched_in_backward": launched_in_backward}


def test_sequence_parallel_grads_reduced_over_tp_then_dp(world4):
    tp, dp = 2, 2                       # _sp_worker with tp=2 on 4 processes
    results = [r["sp"] for r in world4]
    ref = SequenceParallelModel(tp)
    x, y = _sp_data(dp)
    loss = sum(_sp_loss(torch.cat([ref(x[d][:, t * S // tp:(t + 1) * S // tp], t)
                                   for t in range(tp)], dim=1), y[d]) for d in range(dp)) / dp
    loss.backward()
    for res in results:
        t = res["tp_rank"]
        assert sorted(res["sp_buffers"]) == [False, True]
        assert res["launched_in_backward"] == 1    # the TP-sharded bucket; SP waits for TP
        torch.testing.assert_close(res["grads"]["norm_weight"], ref.norm_weight.grad,
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["grads"]["scale"], ref.scale.grad[t:t + 1],
                                   rtol=1e-5, atol=1e-7)
