"""Single-process tests: loss scalers, mixed-precision AdamW, grad norm / clipping, DDP buffers."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from megatron_lsh.config import OptimizerConfig
from megatron_lsh.parallel.data_parallel import DistributedDataParallel, finish_grad_sync, no_sync
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.grad_norm import clip_grad_norm, get_grad_norm
from megatron_lsh.parallel.loss_scaler import ConstantLossScaler, DynamicLossScaler
from megatron_lsh.parallel.optimizer import MixedPrecisionOptimizer, weight_decay_groups
from megatron_lsh.parallel.optimizer_factory import build_optimizer

SINGLE = ProcessGroups.single()


def tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)


def regression_data(seed=1, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.stack([x[:, 0] - 2 * x[:, 1], x[:, 2] * x[:, 3]], dim=1)
    return x, y


# -- loss scalers ------------------------------------------------------------------------------

def test_dynamic_scaler_hysteresis_backoff_and_growth():
    s = DynamicLossScaler(1024.0, min_scale=64.0, growth_interval=3, hysteresis=2)
    s.update(True)
    assert s.scale == 1024.0            # first overflow tolerated (hysteresis 2)
    s.update(True)
    assert s.scale == 512.0             # second one backs off
    s.update(True)
    assert s.scale == 256.0             # tracker exhausted: every further overflow backs off
    s.update(False)
    s.update(False)
    assert s.scale == 256.0
    s.update(False)
    assert s.scale == 512.0             # grown after 3 clean steps, hysteresis refilled
    s.update(True)
    assert s.scale == 512.0
    for _ in range(10):
        s.update(True)
    assert s.scale == 64.0              # never below min_scale


def test_dynamic_scaler_overflow_resets_growth_window():
    s = DynamicLossScaler(8.0, growth_interval=2, hysteresis=5)
    s.update(False)
    s.update(True)                      # interrupts the clean window
    s.update(False)
    assert s.scale == 8.0
    s.update(False)
    assert s.scale == 16.0


def test_dynamic_scaler_state_dict_resumes_exactly():
    a = DynamicLossScaler(2.0 ** 10, growth_interval=4, hysteresis=3)
    for flag in (True, False, False, True, True, False):
        a.update(flag)
    b = DynamicLossScaler(1.0, growth_interval=4, hysteresis=3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for flag in (True, False, False, False, False, True):
        a.update(flag)
        b.update(flag)
        assert (a.scale, a.state_dict()) == (b.scale, b.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(initial_scale=1.0, min_scale=2.0), "min loss scale"),
    (dict(initial_scale=4.0, growth_factor=1.0), "growth factor"),
    (dict(initial_scale=4.0, backoff_factor=1.5), "backoff factor"),
    (dict(initial_scale=4.0, hysteresis=0), "hysteresis"),
])
def test_dynamic_scaler_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicLossScaler(**kwargs)


def test_constant_scaler_never_changes():
    s = ConstantLossScaler()
    s.update(True)
    assert s.scale == 1.0 and not s.dynamic


# -- the optimizer ---------------------------------------------------------------------------

def reference_adamw(model, cfg):
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim == 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def test_fp32_matches_torch_adamw_with_clipping():
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.05)
    model, ref = tiny_model(), tiny_model()
    opt = build_optimizer(model, cfg, SINGLE)
    ref_opt = reference_adamw(ref, cfg)
    x, y = regression_data()
    for _ in range(4):
        opt.zero_grad()
        ref_opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        nn.functional.mse_loss(ref(x), y).backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.clip_grad))
        stepped, norm, scale = opt.step()
        ref_opt.step()
        assert stepped and scale == 1.0
        assert norm == pytest.approx(ref_norm, rel=1e-6)
        assert ref_norm > cfg.clip_grad  # clipping was active
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_no_weight_decay_on_biases_and_norms():
    cfg = OptimizerConfig(lr=0.1, weight_decay=0.5, clip_grad=0.0)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, cfg, SINGLE)
    for p in model.parameters():        # zero gradients: only weight decay can move a parameter
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(model.parameters(), before):
        if p.ndim == 1:
            assert torch.equal(p, b)
        else:
            torch.testing.assert_close(p, b * (1 - 0.1 * 0.5))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    # A scheduler rewriting weight_decay = wd * wd_mult (Megatron's) keeps biases undecayed.
    assert [g["wd_mult"] for g in opt.param_groups] == [1.0, 0.0]
    assert weight_decay_groups([], [], 0.1) == []


def test_lr_settable_per_group():
    opt = build_optimizer(tiny_model(), OptimizerConfig(lr=1e-3), SINGLE)
    opt.set_lr(0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25] and opt.get_lr() == 0.25
    opt.param_groups[1]["lr"] = 0.5     # a scheduler may also write the groups directly
    assert opt.optimizer.param_groups[1]["lr"] == 0.5


def test_build_optimizer_picks_the_loss_scaler():
    fp16 = build_optimizer(tiny_model(torch.float16),
                           OptimizerConfig(fp16=True, initial_loss_scale=256.0, hysteresis=3),
                           SINGLE)
    assert isinstance(fp16.loss_scaler, DynamicLossScaler) and fp16.loss_scaler.scale == 256.0
    assert fp16.loss_scaler.hysteresis == 3 and fp16.check_for_nonfinite
    bf16 = build_optimizer(tiny_model(torch.bfloat16), OptimizerConfig(bf16=True), SINGLE)
    assert isinstance(bf16.loss_scaler, ConstantLossScaler) and not bf16.check_for_nonfinite
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        build_optimizer(tiny_model(), OptimizerConfig(), SINGLE, use_distributed_optimizer=True)


def train(model, opt, steps, x, y):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)
        opt.scale_loss(loss).backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wrap_ddp", [False, True])
def test_half_precision_trains_with_fp32_masters(dtype, wrap_ddp):
    cfg = OptimizerConfig(lr=1e-2, clip_grad=1.0, bf16=dtype == torch.bfloat16,
                          fp16=dtype == torch.float16, initial_loss_scale=2.0 ** 12)
    model = tiny_model(dtype)
    chunk = DistributedDataParallel(model, SINGLE) if wrap_ddp else model
    opt = build_optimizer(chunk, cfg, SINGLE)
    x, y = regression_data()
    losses = train(chunk, opt, 40, x, y)
    assert losses[-1] < 0.6 * losses[0]
    for p, main in zip(opt.model_params, opt._main_params):
        assert p.dtype == dtype and main.dtype == torch.float32 and main is not p
        assert torch.equal(p, main.to(dtype))     # model params are the rounded masters
        if wrap_ddp:
            assert p.main_grad.dtype == torch.float32


def test_fp16_overflow_skips_step_then_training_continues():
    cfg = OptimizerConfig(lr=1e-2, fp16=True, initial_loss_scale=1024.0, hysteresis=2,
                          loss_scale_window=2, clip_grad=0.0)
    model = tiny_model(torch.float16)
    opt = build_optimizer(model, cfg, SINGLE)
    x, y = regression_data()

    def backward(inject_inf):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x.half()).float(), y)
        opt.scale_loss(loss).backward()
        if inject_inf:
            model[0].weight.grad[0, 0] = float("inf")

    snapshot = [p.detach().clone() for p in model.parameters()]
    backward(inject_inf=True)
    stepped, norm, scale = opt.step()
    assert not stepped and math.isnan(norm) and scale == 1024.0
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snapshot))
    assert opt.loss_scaler.scale == 1024.0        # hysteresis 2: first overflow tolerated
    backward(inject_inf=True)
    stepped, _, _ = opt.step()
    assert not stepped and opt.loss_scaler.scale == 512.0
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snapshot))
    backward(inject_inf=False)
    stepped, norm, scale = opt.step()             # finite grads: the step happens
    assert stepped and math.isfinite(norm) and scale == 512.0
    assert not all(torch.equal(p, s) for p, s in zip(model.parameters(), snapshot))
    backward(inject_inf=False)
    opt.step()
    assert opt.loss_scaler.scale == 1024.0        # grown after loss_scale_window=2 clean steps


def test_unscaled_gradient_norm_is_independent_of_the_loss_scale():
    x, y = regression_data()
    norms = []
    for scale in (1.0, 2.0 ** 10):
        model = tiny_model()
        opt = MixedPrecisionOptimizer(model, OptimizerConfig(clip_grad=0.0), SINGLE,
                                      DynamicLossScaler(scale))
        opt.scale_loss(nn.functional.mse_loss(model(x), y)).backward()
        norms.append(opt.step().grad_norm)
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)


def test_state_dict_resume_is_exact_for_bf16():
    cfg = OptimizerConfig(lr=1e-2, bf16=True)
    x, y = regression_data()
    model = tiny_model(torch.bfloat16)
    opt = build_optimizer(model, cfg, SINGLE)
    train(model, opt, 3, x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert all(m.dtype == torch.float32 for m in saved_opt["main_params"])
    train(model, opt, 3, x, y)

    resumed = tiny_model(torch.bfloat16, seed=7)
    resumed.load_state_dict(saved_model)
    resumed_opt = build_optimizer(resumed, cfg, SINGLE)
    resumed_opt.load_state_dict(saved_opt)
    train(resumed, resumed_opt, 3, x, y)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="different parameter shapes"):
        build_optimizer(nn.Linear(3, 3), cfg, SINGLE).load_state_dict(saved_opt)


# -- grad norm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_grad_norm_and_clipping_match_torch(norm_type):
    model, ref = tiny_model(), tiny_model()
    x, y = regression_data()
    for m in (model, ref):
        nn.functional.mse_loss(m(x), y).backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01, norm_type=norm_type))
    assert get_grad_norm(model.parameters(), SINGLE, norm_type) == pytest.approx(ref_norm, rel=1e-6)
    assert clip_grad_norm(model.parameters(), 0.01, SINGLE, norm_type) == pytest.approx(ref_norm,
                                                                                       rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)


def test_tied_copy_marked_shared_is_not_counted():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.full((3,), 2.0), torch.full((3,), 2.0)
    b.shared = True
    assert get_grad_norm([a, b], SINGLE) == pytest.approx(math.sqrt(12.0))


# -- DDP buffers in one process ----------------------------------------------------------------

def test_ddp_single_process_accumulates_in_fp32_main_grad():
    model, ref = tiny_model(torch.bfloat16), tiny_model(torch.float32)
    ddp = DistributedDataParallel(model, SINGLE, bucket_size_mb=1e-4)
    assert len(ddp.buffers) == 1 and len(ddp.buffers[0].buckets) > 1
    x, y = regression_data()
    with ddp.no_sync():
        (nn.functional.mse_loss(ddp(x[:32].bfloat16()).float(), y[:32]) / 2).backward()
    assert ddp.stats["bucket_launches"] == 0
    (nn.functional.mse_loss(ddp(x[32:].bfloat16()).float(), y[32:]) / 2).backward()
    assert ddp.stats["bucket_launches"] == len(ddp.buffers[0].buckets)  # launched in backward
    ddp.finish_grad_sync()
    nn.functional.mse_loss(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad is None and p.main_grad.dtype == torch.float32
        torch.testing.assert_close(p.main_grad, q.grad, rtol=0.05, atol=0.02)
    ddp.zero_grad_buffer()
    nn.functional.mse_loss(ddp(x.bfloat16()).float(), y).backward()
    with pytest.raises(RuntimeError, match="already reduced"):  # forgot no_sync()
        nn.functional.mse_loss(ddp(x.bfloat16()).float(), y).backward()
    ddp.zero_grad_buffer()
    assert all(float(p.main_grad.abs().sum()) == 0 for p in model.parameters())


def test_chunk_helpers_cover_every_ddp_chunk():
    first, second = DistributedDataParallel(nn.Linear(4, 4), SINGLE), \
        DistributedDataParallel(nn.Linear(4, 1), SINGLE)
    chunks = [first, second, nn.Identity()]          # plain modules are ignored
    x = torch.randn(3, 4)
    with no_sync(chunks):
        second(first(x)).sum().backward()
    assert first.stats["bucket_launches"] == second.stats["bucket_launches"] == 0
    second(first(x)).sum().backward()
    finish_grad_sync(chunks)
    assert first.stats["bucket_launches"] == second.stats["bucket_launches"] == 1
    expected = x.sum(0) * second.module.weight.detach().view(-1, 1) * 2   # two backwards
    torch.testing.assert_close(first.module.weight.main_grad, expected)
