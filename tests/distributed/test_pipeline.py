"""Pipeline schedules: a chain of layers split over stages equals the single-process chain."""
import pytest
import torch
import torch.distributed as dist

from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups
from megatron_lsh.parallel.p2p import PipelineP2P
from megatron_lsh.parallel.pipeline import (StageOutput, forward_backward, stage_layer_range)
from megatron_lsh.parallel.spawn import run_distributed

LAYERS, WIDTH, MICRO, MB_SIZE = 4, 8, 4, 3


def build_chain(seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))


def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(MB_SIZE, WIDTH, generator=g), torch.randn(MB_SIZE, WIDTH, generator=g))
            for _ in range(MICRO)]


def make_forward_step(layers, data, first, last, aux_coeff):
    def forward_step(mb, inputs):
        x = data[mb][0] if first else inputs[0]
        for layer in layers:
            x = torch.tanh(layer(x))
        # An auxiliary loss on every stage, like MoE load balancing, must reach backward too.
        aux = aux_coeff * sum(layer.weight.square().sum() for layer in layers)
        if last:
            lm = torch.nn.functional.mse_loss(x, data[mb][1])
            return StageOutput(loss=lm + aux, report={"lm loss": lm.detach()})
        return StageOutput(outputs=[x], loss=aux)
    return forward_step


def reference(aux_coeff):
    layers = build_chain()
    fs = make_forward_step(layers, batches(), True, True, aux_coeff)
    losses = []
    for mb in range(MICRO):
        out = fs(mb, None)
        (out.loss / MICRO).backward()
        losses.append(out.report["lm loss"].item())
    return losses, [p.grad.clone() for p in layers.parameters()]


def _pipeline_worker(rank, world, schedule, aux_coeff):
    dims = ParallelDims(world, pp=world)
    groups = ProcessGroups.build(dims)
    chain = build_chain()
    mine = [chain[i] for i in stage_layer_range(LAYERS, world, groups.pp_rank)]
    fs = make_forward_step(mine, batches(), groups.is_first_stage, groups.is_last_stage,
                           aux_coeff)
    reports = forward_backward(fs, MICRO, groups, PipelineP2P(groups), schedule=schedule)
    grads = {name: p.grad.clone() for name, p in chain.named_parameters() if p.grad is not None}
    dist.barrier()
    return [r["lm loss"].item() for r in reports], grads


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("schedule", ["1f1b", "afab"])
def test_pipeline_matches_single_process(world, schedule):
    ref_losses, ref_grads = reference(aux_coeff=1e-3)
    results = run_distributed(_pipeline_worker, world, schedule, 1e-3, timeout=120)
    assert results[-1][0] == pytest.approx(ref_losses, rel=1e-6)
    for stage_losses, _ in results[:-1]:
        assert stage_losses == []
    merged = {}
    for _, grads in results:
        merged.update(grads)
    names = [n for n, _ in build_chain().named_parameters()]
    assert sorted(merged) == sorted(names)
    for name, ref in zip(names, ref_grads):
        torch.testing.assert_close(merged[name], ref, rtol=1e-5, atol=1e-7)


def test_stage_layer_range_refuses_uneven_split():
    assert list(stage_layer_range(8, 4, 1)) == [2, 3]
    with pytest.raises(ValueError, match=r"num-layers \(6\) is not divisible by "
                                         r"pipeline-model-parallel-size \(4\)"):
        stage_layer_range(6, 4, 0)
