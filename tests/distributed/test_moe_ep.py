"""Expert-parallel MoE on gloo against the single-process layer: outputs and every gradient.

Each worker runs a list of scenarios in one process group (spawning is the slow part). A
scenario fixes a layout (world, tp, ep, sequence parallelism), a MoE config and how the tokens
look on each rank. The reference is the single-process layer (same seed) run on each distinct
token set ("unit": a data-parallel rank's tokens, or a rank's own shard under sequence
parallelism) with the same loss; the references' gradients summed over the units must equal
the distributed gradients summed over the ranks that hold each parameter.
"""
from __future__ import annotations

import pytest
import torch

from megatron_lsh.config import MoEConfig
from megatron_lsh.moe import MoELayer
from megatron_lsh.moe.compressors import compression
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups
from megatron_lsh.parallel.spawn import run_distributed

HIDDEN, FFN, EXPERTS = 16, 24, 8


def scenario(name, world, tp=1, ep=1, sp=False, tokens="normal", compressor="none",
             options=None, rel_tol=None, **moe):
    cfg = dict(num_experts=EXPERTS, router_topk=2, aux_loss_coeff=1e-2, z_loss_coeff=1e-3,
               **compression(compressor, **(options or {})))
    cfg.update(moe)
    return dict(name=name, world=world, tp=tp, ep=ep, sp=sp, tokens=tokens, moe=cfg,
                rel_tol=rel_tol)


def unit_of(rank, sc):
    """Which token set a rank holds: its DP index, or the rank itself under sequence parallel."""
    dims = ParallelDims(sc["world"], tp=sc["tp"], ep=sc["ep"])
    return rank if (sc["sp"] or sc["tp"] == 1) else dims.coordinates(rank)[1]


def unit_tokens(unit, sc):
    """[s, b, h] tokens of one unit (deterministic, so workers and the parent agree)."""
    gen = torch.Generator().manual_seed(100 + unit)
    kind = sc["tokens"]
    shape = (7, 3, HIDDEN)
    if kind == "empty_on_1" and unit == 1 or kind == "all_empty":
        shape = (0, 3, HIDDEN)
    x = torch.randn(shape, generator=gen)
    if kind == "all_to_0" or (kind == "skewed" and unit == 0):
        x = x.abs() + 0.5                               # the crafted router sends these to expert 0
    return x


def loss_weights(unit, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(500 + unit))


def build_layer(sc, groups):
    layer = MoELayer(MoEConfig(**sc["moe"]), HIDDEN, FFN, groups, seed=21,
                     sequence_parallel=sc["sp"])
    if sc["tokens"] in ("all_to_0", "skewed"):
        with torch.no_grad():
            layer.router.weight.mul_(10.0)
            layer.router.weight[0] = 5.0
    return layer


def forward_backward(layer, x, unit, tp_for_losses=1):
    x = x.clone().requires_grad_()
    y, losses = layer(x)
    loss = (y * loss_weights(unit, y.shape)).sum() + losses["aux_loss"] + losses["z_loss"]
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters()}
    return dict(y=y.detach(), x_grad=x.grad, grads=grads,
                aux=float(losses["aux_loss"].detach()), stats=layer.last_stats.as_dict(),
                rotations=getattr(layer.compressor, "rotations", None))


def worker(rank, world, scenarios):
    results = []
    for sc in scenarios:
        dims = ParallelDims(world, tp=sc["tp"], ep=sc["ep"])
        groups = ProcessGroups.build(dims, rank)
        layer = build_layer(sc, groups)
        unit = unit_of(rank, sc)
        out = forward_backward(layer, unit_tokens(unit, sc), unit)
        out.update(ep_rank=groups.ep_rank, tp_rank=groups.tp_rank,
                   local_experts=layer.experts.num_local_experts)
        results.append(out)
    return results


def reference(sc, unit):
    layer = build_layer(dict(sc, sp=False), ProcessGroups.single())
    x = unit_tokens(unit, sc)
    out = forward_backward(layer, x, unit)
    if sc["sp"]:
        # Under sequence parallelism the worker's losses are divided by tp.
        layer.zero_grad()
        xr = x.clone().requires_grad_()
        y, losses = layer(xr)
        loss = (y * loss_weights(unit, y.shape)).sum() + (losses["aux_loss"]
                                                          + losses["z_loss"]) / sc["tp"]
        loss.backward()
        out["x_grad"] = xr.grad
        out["grads"] = {n: p.grad.detach().clone() for n, p in layer.named_parameters()}
    return out


def _close(got, want, sc, atol):
    """fp32-tight; or, for a lossy codec whose rounding depends on the layout (``rel_tol``),
    within that relative (Frobenius) error."""
    if sc["rel_tol"] is None:
        return torch.allclose(got, want, atol=atol)
    return bool((got - want).norm() <= sc["rel_tol"] * want.norm())


def check(sc, results, atol=2e-5):
    world = sc["world"]
    units = sorted({unit_of(r, sc) for r in range(world)})
    refs = {u: reference(sc, u) for u in units}
    for rank, got in enumerate(results):
        ref = refs[unit_of(rank, sc)]
        assert _close(got["y"], ref["y"], sc, atol), (sc["name"], rank, "output")
        assert _close(got["x_grad"], ref["x_grad"], sc, atol), (sc["name"], rank, "dx")
        # Router (dense, replicated): the full gradient of the rank's unit, on TP peers too
        # (under sequence parallelism, the rank's own shard before the TP all-reduce).
        assert _close(got["grads"]["router.weight"], ref["grads"]["router.weight"], sc,
                      atol), (sc["name"], rank, "router grad")
    # Experts: summed over every rank that holds the expert.
    for name in results[0]["grads"]:
        if not name.startswith("experts."):
            continue
        total = sum(r["grads"][name] for r in refs.values())
        gathered = torch.zeros_like(total)
        for got in results:
            n = got["local_experts"]
            gathered[got["ep_rank"] * n:(got["ep_rank"] + 1) * n] += got["grads"][name]
        assert _close(gathered, total, sc, atol), (sc["name"], name)


WORLD2 = [
    scenario("ep2-none", 2, ep=2),
    scenario("ep1-dp2-none", 2, ep=1),
    scenario("ep2-lsh", 2, ep=2, compressor="lsh", options={"num_hashes": 2}),
    scenario("ep2-lsh-nocomp", 2, ep=2, compressor="lsh",
             options={"num_hashes": 3, "compensation": "none"}),
    scenario("ep2-lsh-linear", 2, ep=2, compressor="lsh",
             options={"num_hashes": 3, "compensation": "linear", "linear_rank": 4}),
    scenario("ep2-cast-fp8", 2, ep=2, compressor="cast", options={"dtype": "fp8"}),
    scenario("ep2-cast-fp8-centered", 2, ep=2, compressor="cast",
             options={"dtype": "fp8-centered"}),
    scenario("ep2-top1-capacity", 2, ep=2, router_topk=1, capacity_factor=1.0),
    scenario("ep2-empty-rank", 2, ep=2, tokens="empty_on_1"),
    scenario("ep2-all-empty", 2, ep=2, tokens="all_empty", compressor="lsh"),
    scenario("ep2-all-to-expert0", 2, ep=2, tokens="all_to_0", router_topk=1),
    scenario("ep2-skewed-lsh", 2, ep=2, tokens="skewed", router_topk=1, compressor="lsh"),
]

WORLD4 = [
    scenario("ep4-none", 4, ep=4),
    scenario("ep4-lsh", 4, ep=4, compressor="lsh", options={"num_hashes": 3}),
    scenario("tp2-ep2-none", 4, tp=2, ep=2),
    scenario("tp2-ep4-lsh", 4, tp=2, ep=4, compressor="lsh", options={"num_hashes": 2}),
    scenario("tp2-ep2-lsh-target", 4, tp=2, ep=2, compressor="lsh",
             options={"num_hashes": 0, "target_rate": 0.3, "compensation": "scaled"}),
    # Each TP rank sends a share of every expert's centroids, so the centred fp8 wire takes
    # its means over shares: rounding differs from TP=1 (per-row fp8 errors are ~3%).
    scenario("tp2-ep2-lsh-target-fp8c", 4, tp=2, ep=2, compressor="lsh",
             options={"num_hashes": 0, "target_rate": 0.3, "wire_dtype": "fp8-centered"},
             rel_tol=0.1),
    scenario("tp2-ep2-lsh-linear", 4, tp=2, ep=2, compressor="lsh",
             options={"num_hashes": 0, "target_rate": 0.3, "compensation": "linear"}),
    scenario("tp2-ep4-sp-none", 4, tp=2, ep=4, sp=True),
    scenario("ep4-empty-rank", 4, ep=4, tokens="empty_on_1", router_topk=1),
]


@pytest.fixture(scope="module")
def world2_results():
    return run_distributed(worker, 2, WORLD2, timeout=240)


@pytest.fixture(scope="module")
def world4_results():
    return run_distributed(worker, 4, WORLD4, timeout=240)


@pytest.mark.parametrize("index", range(len(WORLD2)), ids=[s["name"] for s in WORLD2])
def test_world2_matches_single_process(world2_results, index):
    check(WORLD2[index], [per_rank[index] for per_rank in world2_results])


@pytest.mark.parametrize("index", range(len(WORLD4)), ids=[s["name"] for s in WORLD4])
def test_world4_matches_single_process(world4_results, index):
    check(WORLD4[index], [per_rank[index] for per_rank in world4_results])


def test_crafted_routing_really_is_skewed():
    """The edge-case scenarios route as intended (else they would test nothing special)."""
    sc = WORLD2[[s["name"] for s in WORLD2].index("ep2-skewed-lsh")]
    layer = build_layer(sc, ProcessGroups.single())
    to_0 = layer.router(unit_tokens(0, sc).reshape(-1, HIDDEN)).experts_TK
    assert bool((to_0 == 0).all())                      # rank 0 sends nothing to rank 1
    mixed = layer.router(unit_tokens(1, sc).reshape(-1, HIDDEN)).experts_TK
    assert len(set(mixed.reshape(-1).tolist())) > 1
    assert unit_tokens(1, WORLD2[[s["name"] for s in WORLD2].index("ep2-empty-rank")]).numel() == 0


def test_rotations_identical_on_all_ranks(world4_results):
    index = [s["name"] for s in WORLD4].index("ep4-lsh")
    rotations = [per_rank[index]["rotations"] for per_rank in world4_results]
    assert all(torch.equal(r, rotations[0]) for r in rotations)
    assert torch.equal(rotations[0], reference(WORLD4[index], 0)["rotations"])


def test_bytes_on_the_wire(world2_results):
    """Two ranks, fp32: forward = counts to the peer + rows to and from it; backward = rows."""
    index = [s["name"] for s in WORLD2].index("ep2-none")
    for rank, per_rank in enumerate(world2_results):
        stats = per_rank[index]["stats"]
        assert stats["bytes_fwd"] == stats["bytes_bwd"] + 8 * (EXPERTS // 2)
        assert 0 < stats["bytes_bwd"] < stats["bytes_bwd_total"]
        assert stats["bytes_bwd_total"] % (4 * HIDDEN) == 0
    lsh_index = [s["name"] for s in WORLD2].index("ep2-lsh")
    for per_rank in world2_results:
        stats = per_rank[lsh_index]["stats"]
        assert stats["sent_rows"] < stats["rows"] and 0 < stats["mean_cosine"] < 1
