"""Grouped experts: marking, layout-independent init, activations, meta device, dense MLP."""
import pytest
import torch
import torch.nn.functional as F

from megatron_lsh.config import ConfigError, MoEConfig
from megatron_lsh.moe import MoELayer
from megatron_lsh.moe.experts import GroupedExperts
from megatron_lsh.parallel.dims import ProcessGroups


def test_every_expert_parameter_is_marked():
    experts = GroupedExperts(4, 8, 16)
    names = {n for n, _ in experts.named_parameters()}
    assert names == {"fc1_weight", "fc2_weight", "fc1_bias", "fc2_bias"}
    assert all(getattr(p, "is_expert", False) for p in experts.parameters())
    no_bias = GroupedExperts(4, 8, 16, add_bias=False)
    assert {n for n, _ in no_bias.named_parameters()} == {"fc1_weight", "fc2_weight"}


def test_init_does_not_depend_on_the_expert_parallel_layout():
    full = GroupedExperts(8, 16, 32, seed=9, activation="swiglu")
    for ep_rank in range(4):
        part = GroupedExperts(8, 16, 32, seed=9, activation="swiglu", ep_rank=ep_rank, ep_size=4)
        sl = slice(2 * ep_rank, 2 * ep_rank + 2)
        assert torch.equal(part.fc1_weight, full.fc1_weight[sl])
        assert torch.equal(part.fc2_weight, full.fc2_weight[sl])


def test_init_std_and_zero_biases():
    experts = GroupedExperts(4, 256, 512, init_method_std=0.02,
                             output_layer_init_std=0.005).requires_grad_(False)
    assert abs(float(experts.fc1_weight.std()) - 0.02) < 1e-3
    assert abs(float(experts.fc2_weight.std()) - 0.005) < 3e-4
    assert float(experts.fc1_bias.abs().sum()) == 0.0


def test_meta_device_builds_without_initialising():
    experts = GroupedExperts(512, 1024, 4096, device="meta")
    assert experts.fc1_weight.is_meta and experts.fc1_weight.shape == (512, 1024, 4096)


def test_bad_layout_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"--num-experts \(6\) is not divisible"):
        GroupedExperts(6, 8, 16, ep_size=4)


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_each_expert_is_an_ordinary_mlp(activation):
    experts = GroupedExperts(3, 8, 16, activation=activation, seed=2)
    with torch.no_grad():
        experts.fc1_bias.normal_()
        experts.fc2_bias.normal_()
    x = torch.randn(10, 8)
    counts = [4, 0, 6]
    out = experts(x, counts)
    start = 0
    for e, n in enumerate(counts):
        h = x[start:start + n] @ experts.fc1_weight[e] + experts.fc1_bias[e]
        if activation == "swiglu":
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h) if activation == "gelu" else F.relu(h)
        expected = h @ experts.fc2_weight[e] + experts.fc2_bias[e]
        assert torch.allclose(out[start:start + n], expected, atol=1e-6)
        start += n
    out.sum().backward()
    assert torch.equal(experts.fc1_weight.grad[1], torch.zeros(8, 16 * (2 if activation == "swiglu" else 1)))


def test_one_expert_top1_dropless_layer_equals_a_dense_mlp():
    cfg = MoEConfig(num_experts=1, router_topk=1)
    layer = MoELayer(cfg, 12, 24, ProcessGroups.single(), activation="gelu", seed=4)
    with torch.no_grad():
        layer.experts.fc1_bias.normal_()
        layer.experts.fc2_bias.normal_()
    ex = layer.experts
    x = torch.randn(5, 3, 12, requires_grad=True)
    y, _ = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(F.gelu(F.linear(x_ref, ex.fc1_weight[0].t(), ex.fc1_bias[0])),
                     ex.fc2_weight[0].t(), ex.fc2_bias[0])
    assert y.shape == x.shape
    assert torch.allclose(y, y_ref, atol=1e-6)
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
