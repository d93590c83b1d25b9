"""Grad norm across TP/PP/DP/EP, the world-wide skip on overflow, and ZeRO-1 against AdamW."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from megatron_lsh.config import OptimizerConfig
from megatron_lsh.parallel.data_parallel import DistributedDataParallel
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups
from megatron_lsh.parallel.grad_norm import clip_grad_norm, get_grad_norm
from megatron_lsh.parallel.loss_scaler import DynamicLossScaler
from megatron_lsh.parallel.optimizer import MixedPrecisionOptimizer
from megatron_lsh.parallel.optimizer_factory import build_optimizer
from megatron_lsh.parallel.spawn import run_distributed
from tests.distributed.test_data_parallel import MB, TinyMoE, batch, local_model

# -- grad norm ---------------------------------------------------------------------------------

LAYOUTS = [dict(tp=2, pp=2, ep=2), dict(tp=2, pp=1, ep=2)]  # world 4: dp 1 and dp 2


def reference_stage_grads(pp_rank: int, tp: int, ep: int) -> dict:
    """Unsharded gradients of one stage: W (8x6, split on dim 0 over TP), b (8), E (ep experts)."""
    g = torch.Generator().manual_seed(100 + pp_rank)
    return {"W": torch.randn(4 * tp, 6, generator=g), "b": torch.randn(4 * tp, generator=g),
            "E": torch.randn(ep, 4, 4, generator=g)}


def _norm_worker(rank, world_size):
    out = []
    for layout in LAYOUTS:
        groups = ProcessGroups.build(ParallelDims(world_size, **layout))
        full = reference_stage_grads(groups.pp_rank, layout["tp"], layout["ep"])
        t, e = groups.tp_rank, groups.ep_rank
        w = nn.Parameter(torch.zeros(4, 6))
        w.tensor_model_parallel = True
        b = nn.Parameter(torch.zeros(4 * layout["tp"]))
        experts = nn.Parameter(torch.zeros(1, 4, 4))
        experts.is_expert = True
        w.grad = full["W"][4 * t:4 * (t + 1)].clone()
        b.grad = full["b"].clone()                 # replicated over TP (and DP)
        experts.main_grad = full["E"][e:e + 1].clone()   # read like a DDP buffer
        params = [w, b, experts]
        norm2 = get_grad_norm(params, groups)
        norm_inf = get_grad_norm(params, groups, norm_type=math.inf)
        max_norm = 0.5 * norm2
        returned = clip_grad_norm(params, max_norm, groups)
        out.append({"pp": groups.pp_rank, "tp": t, "ep": e, "norm2": norm2,
                    "norm_inf": norm_inf, "returned": returned, "max_norm": max_norm,
                    "W": w.grad, "b": b.grad, "E": experts.main_grad})
    return out


def _inf_worker_check(rank, groups):
    """Only the last rank sees an inf: every rank must skip (found-inf is a world MAX)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = MixedPrecisionOptimizer(model, OptimizerConfig(clip_grad=1.0), groups,
                                  DynamicLossScaler(8.0, hysteresis=1))
    before = model.weight.detach().clone()
    opt.scale_loss(model(torch.ones(1, 3)).sum()).backward()
    if rank == groups.dims.world_size - 1:
        model.bias.grad[0] = float("nan")
    stepped, _, _ = opt.step()
    return {"stepped": stepped, "unchanged": torch.equal(before, model.weight),
            "scale": opt.loss_scaler.scale}


def _norm_and_skip_worker(rank, world_size):
    out = _norm_worker(rank, world_size)
    groups = ProcessGroups.build(ParallelDims(world_size))
    return {"norms": out, "skip": _inf_worker_check(rank, groups)}


def test_grad_norm_counts_every_parameter_once_and_skip_is_world_wide(world4):
    results = [r["norm_and_skip"] for r in world4]
    for i, layout in enumerate(LAYOUTS):
        stages = [reference_stage_grads(s, layout["tp"], layout["ep"])
                  for s in range(layout["pp"])]
        flat = torch.cat([g.flatten() for st in stages for g in st.values()])
        ref2, ref_inf = float(flat.norm()), float(flat.abs().max())
        for res in (r["norms"][i] for r in results):
            assert res["norm2"] == pytest.approx(ref2, rel=1e-6), layout
            assert res["returned"] == pytest.approx(ref2, rel=1e-6)
            assert res["norm_inf"] == pytest.approx(ref_inf, rel=1e-6)
            coeff = res["max_norm"] / (ref2 + 1e-6)
            full = stages[res["pp"]]
            t, e = res["tp"], res["ep"]
            torch.testing.assert_close(res["W"], full["W"][4 * t:4 * (t + 1)] * coeff)
            torch.testing.assert_close(res["b"], full["b"] * coeff)
            torch.testing.assert_close(res["E"], full["E"][e:e + 1] * coeff)
    skips = [r["skip"] for r in results]
    assert skips == [{"stepped": False, "unchanged": True, "scale": 4.0}] * 4


# -- ZeRO-1 ------------------------------------------------------------------------------------

STEPS = 4
CFG = dict(lr=3e-2, weight_decay=0.1, clip_grad=0.5, adam_beta2=0.99)
BUCKET_MB = 40 * 4 / 2 ** 20   # tiny buckets: several per buffer, parameters split over ranks


def _loss(model, x, y, dp_rank, dtype=torch.float32):
    rows = slice(dp_rank * MB, (dp_rank + 1) * MB)
    return nn.functional.mse_loss(model(x[rows].to(dtype), 0).float(), y[rows])


def _zero_setup(groups, ep, dtype=torch.float32, seed_model=None):
    model = local_model(TinyMoE(ep), groups.ep_rank).to(dtype)
    if seed_model is not None:
        model.load_state_dict(seed_model)
    ddp = DistributedDataParallel(model, groups, bucket_size_mb=BUCKET_MB,
                                  use_distributed_optimizer=True, shard_alignment=1)
    cfg = OptimizerConfig(**CFG, bf16=dtype == torch.bfloat16)
    return model, ddp, build_optimizer(ddp, cfg, groups, use_distributed_optimizer=True)


def _zero_steps(ddp, opt, groups, first_step, steps):
    norms, losses = [], []
    for step in range(first_step, first_step + steps):
        opt.zero_grad()
        x, y = batch(groups.dp_size, seed=step)
        loss = _loss(ddp, x, y, groups.dp_rank, next(ddp.parameters()).dtype)
        loss.backward()
        ddp.finish_grad_sync()
        stepped, norm, _ = opt.step()
        assert stepped
        norms.append(norm)
        losses.append(float(loss.detach()))
    return norms, losses


def _zero_worker(rank, world_size, ep):
    groups = ProcessGroups.build(ParallelDims(world_size, ep=ep))
    model, ddp, opt = _zero_setup(groups, ep)
    norms, _ = _zero_steps(ddp, opt, groups, 0, STEPS)
    out = {"ep_rank": groups.ep_rank, "norms": norms,
           "params": {n: p.detach().clone() for n, p in model.named_parameters()},
           "full_state": opt.gather_full_state(),
           "names": [dict((id(p), n) for n, p in model.named_parameters())[id(p)]
                     for p in opt.model_params],
           "num_buckets": sum(len(b.buckets) for b in ddp.buffers)}

    # Resume: save after 2 steps, continue 2; a fresh model + optimizer loaded from the save
    # must reproduce the same 2 steps bit for bit.
    model, ddp, opt = _zero_setup(groups, ep)
    _zero_steps(ddp, opt, groups, 0, 2)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _zero_steps(ddp, opt, groups, 2, 2)
    model2, ddp2, opt2 = _zero_setup(groups, ep, seed_model=saved_model)
    opt2.load_state_dict(saved_opt)
    _zero_steps(ddp2, opt2, groups, 2, 2)
    out["resume_exact"] = all(torch.equal(p, q) for p, q in zip(model.parameters(),
                                                               model2.parameters()))
    out["shard_numel"] = sum(m.numel() for m in saved_opt["main_params"])
    out["shard_state_numel"] = sum(s["exp_avg"].numel()
                                   for s in saved_opt["optimizer"]["state"].values())

    # bf16 with ZeRO-1: trains, fp32 master shards, bf16 params identical on every replica.
    model, ddp, opt = _zero_setup(groups, ep, torch.bfloat16)
    _, losses = _zero_steps(ddp, opt, groups, 0, 1)
    for _ in range(12):
        losses += _zero_steps(ddp, opt, groups, 0, 1)[1]   # the same batch: loss must fall
    out["bf16_losses"] = losses
    out["bf16_dtypes"] = ({p.dtype for p in model.parameters()},
                          {m.dtype for m in opt._main_params})
    out["bf16_dense"] = model.fc1.weight.detach().clone()
    return out


def _reference_run(dp, ep):
    """Plain torch AdamW on the unsharded model, whole batch, clipped like the optimizer."""
    model = TinyMoE(ep)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": CFG["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=CFG["lr"], betas=(0.9, CFG["adam_beta2"]), eps=1e-8)
    norms = []
    for step in range(STEPS):
        opt.zero_grad()
        x, y = batch(dp, seed=step)
        (sum(_loss(lambda xb, _: model(xb, r % ep), x, y, r) for r in range(dp)) / dp).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CFG["clip_grad"])))
        opt.step()
    return model, opt, norms


def _world4_worker(rank, world_size):
    # Both 4-process scenarios in one launch: starting processes is most of a test's time.
    return {"norm_and_skip": _norm_and_skip_worker(rank, world_size),
            "zero": _zero_worker(rank, world_size, 2)}


@pytest.fixture(scope="module")
def world4():
    return run_distributed(_world4_worker, 4, timeout=180)


@pytest.mark.parametrize("dp, ep", [(2, 1), (4, 2)])
def test_zero1_matches_plain_adamw(dp, ep, request):
    if dp == 4:
        results = [r["zero"] for r in request.getfixturevalue("world4")]
    else:
        results = run_distributed(_zero_worker, dp, ep, timeout=150)
    ref, ref_opt, ref_norms = _reference_run(dp, ep)
    ref_params = dict(ref.named_parameters())
    total_numel = sum(p.numel() for n, p in ref_params.items() if n != "experts") \
        + ref_params["experts"].numel() // ep
    for r, res in enumerate(results):
        e = res["ep_rank"]

        def expected(name, tensor):
            return tensor[e:e + 1] if name == "experts" else tensor

        assert res["num_buckets"] > 2
        assert res["norms"] == pytest.approx(ref_norms, rel=1e-5)
        assert ref_norms[0] > CFG["clip_grad"]          # clipping was active
        for name, p in res["params"].items():
            torch.testing.assert_close(p, expected(name, ref_params[name]), rtol=1e-5,
                                       atol=1e-6, msg=f"rank {r} {name}")
        for name, state in zip(res["names"], res["full_state"]):
            ref_state = ref_opt.state[ref_params[name]]
            torch.testing.assert_close(state["param"], expected(name, ref_params[name]),
                                       rtol=1e-5, atol=1e-6)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state[key], expected(name, ref_state[key]),
                                           rtol=1e-5, atol=1e-8, msg=f"rank {r} {name} {key}")
        assert res["resume_exact"]
        assert res["shard_state_numel"] == res["shard_numel"]
        # Each rank holds only its slice: dense split over dp, experts over expert-DP.
        assert res["shard_numel"] < total_numel
    dense_numel = total_numel - ref_params["experts"].numel() // ep
    expert_share = ref_params["experts"].numel() // ep
    assert sum(r["shard_numel"] for r in results) == dense_numel + expert_share * ep

    for res in results:
        losses = res["bf16_losses"]
        assert losses[-1] < 0.8 * losses[0]
        assert res["bf16_dtypes"] == ({torch.bfloat16}, {torch.float32})
        assert torch.equal(res["bf16_dense"], results[0]["bf16_dense"])
