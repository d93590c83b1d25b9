"""Top-k router: choices, gates, capacity, aux and z losses, precision, empty input."""
import math

import pytest
import torch

from megatron_lsh.config import ConfigError
from megatron_lsh.moe.router import TopKRouter


def _router(**kw):
    args = dict(hidden_size=8, num_experts=4, topk=2, seed=3)
    args.update(kw)
    return TopKRouter(**args)


def test_topk_choices_and_gates():
    router = _router()
    x = torch.randn(30, 8)
    routing = router(x)
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    top_p, top_e = torch.topk(probs, 2, dim=-1)
    assert torch.equal(routing.experts_TK, top_e)
    assert torch.allclose(routing.gates_TK, top_p / top_p.sum(-1, keepdim=True))
    assert routing.kept_TK is None

    top1 = _router(topk=1)(x)                           # Switch: the raw probability
    probs1 = torch.softmax(x @ _router(topk=1).weight.t(), dim=-1)
    assert torch.allclose(top1.gates_TK[:, 0], probs1.max(-1).values)


def test_capacity_keeps_the_highest_gates_per_expert():
    router = _router(topk=1, capacity_factor=1.0)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 5.0                       # most tokens prefer expert 0
    x = torch.randn(40, 8)
    x[:, 0] = x[:, 0].abs() + 0.1
    routing = router(x)
    capacity = math.ceil(40 * 1 / 4 * 1.0)
    kept, experts = routing.kept_TK[:, 0], routing.experts_TK[:, 0]
    for e in range(4):
        assert int((kept & (experts == e)).sum()) == min(capacity, int((experts == e).sum()))
    chosen0 = experts == 0
    gates0 = routing.gates_TK[:, 0]
    assert gates0[chosen0 & kept].min() >= gates0[chosen0 & ~kept].max()


def test_dropless_when_capacity_factor_is_none():
    assert _router()(torch.randn(10, 8)).kept_TK is None


def test_aux_and_z_loss_values():
    router = _router(aux_loss_coeff=0.1, z_loss_coeff=0.01)
    x = torch.randn(50, 8)
    routing = router(x)
    logits = x @ router.weight.t()
    probs = torch.softmax(logits, dim=-1)
    counts = torch.zeros(4).scatter_add_(0, routing.experts_TK.reshape(-1), torch.ones(100))
    expected_aux = 0.1 * 4 * ((counts / 100) * probs.mean(0)).sum()
    expected_z = 0.01 * torch.logsumexp(logits, -1).square().mean()
    assert torch.allclose(routing.aux_loss, expected_aux)
    assert torch.allclose(routing.z_loss, expected_z)
    (routing.aux_loss + routing.z_loss).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_router_math_runs_in_fp32_for_bf16_inputs():
    router = _router().to(torch.bfloat16)
    routing = router(torch.randn(6, 8, dtype=torch.bfloat16))
    assert routing.gates_TK.dtype == torch.float32


def test_empty_input_gives_zero_losses_connected_to_the_graph():
    router = _router(aux_loss_coeff=0.1, z_loss_coeff=0.1, capacity_factor=1.0)
    routing = router(torch.zeros(0, 8))
    assert routing.gates_TK.shape == (0, 2)
    assert float(routing.aux_loss.detach()) == 0.0 and float(routing.z_loss.detach()) == 0.0
    (routing.aux_loss + routing.z_loss).backward()
    assert torch.equal(router.weight.grad, torch.zeros_like(router.weight))


def test_same_seed_same_weights_and_meta_device_skips_init():
    assert torch.equal(_router().weight, _router().weight)
    assert _router(device="meta").weight.is_meta


def test_bad_topk_is_one_clear_error():
    with pytest.raises(ConfigError, match="--moe-router-topk"):
        _router(topk=5)


def test_extra_columns_share_the_router_matmul_without_changing_gradients():
    router = _router(aux_loss_coeff=0.1, z_loss_coeff=0.1)
    extra = torch.randn(8, 6)
    results = []
    for columns in (None, extra):
        x = torch.randn(12, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
        routing = router(x, columns)
        (routing.gates_TK.sum() * 3 + routing.aux_loss + routing.z_loss).backward()
        results.append((routing, x.grad, router.weight.grad.clone()))
        router.zero_grad()
    (plain, dx, dw), (fused, fdx, fdw) = results
    assert plain.columns_TQ is None
    assert torch.allclose(fused.columns_TQ, x.detach() @ extra, atol=1e-6)
    assert torch.equal(plain.experts_TK, fused.experts_TK)
    assert torch.allclose(plain.gates_TK, fused.gates_TK, atol=1e-6)
    assert torch.allclose(dx, fdx, atol=1e-6) and torch.allclose(dw, fdw, atol=1e-6)
