"""MoELayer on one process: none == the plain MoE sum, shapes, edge cases, cast, stats, config."""
import pytest
import torch

from megatron_lsh.config import ConfigError, MoEConfig
from megatron_lsh.moe import MoELayer
from megatron_lsh.moe.compressors import compression
from megatron_lsh.moe.compressors.none import NoCompression
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups

HIDDEN, FFN = 16, 32


def _layer(compressor="none", options=None, **cfg):
    args = dict(num_experts=4, router_topk=2, **compression(compressor, **(options or {})))
    args.update(cfg)
    return MoELayer(MoEConfig(**args), HIDDEN, FFN, ProcessGroups.single(), seed=11)


def _run(layer, x, seed=0):
    x = x.clone().requires_grad_()
    y, losses = layer(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    ((y * weights).sum() + losses["aux_loss"] + losses["z_loss"]).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    return y.detach(), x.grad, grads, losses


def test_none_compressor_is_the_plain_gate_weighted_sum_of_expert_outputs():
    """Reference written token by token: out_t = sum_j g_tj * expert_{e_tj}(x_t)."""
    layer = _layer(z_loss_coeff=1e-3)
    assert isinstance(layer.compressor, NoCompression)
    x = torch.randn(7, 3, HIDDEN)
    got = _run(layer, x)

    def reference(x_in):
        x_TH = x_in.reshape(-1, HIDDEN)
        routing = layer.router(x_TH)
        outputs = []
        for t in range(x_TH.shape[0]):
            out = 0.0
            for j in range(2):
                counts = [0] * 4
                counts[int(routing.experts_TK[t, j])] = 1
                out = out + routing.gates_TK[t, j] * layer.experts(x_TH[t:t + 1], counts)[0]
            outputs.append(out)
        losses = {"aux_loss": routing.aux_loss, "z_loss": routing.z_loss}
        return torch.stack(outputs).reshape(x_in.shape), losses

    layer.forward = reference
    want = _run(layer, x)
    assert torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert torch.allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
    for name in got[2]:
        assert torch.allclose(got[2][name], want[2][name], rtol=1e-6, atol=1e-6), name


def test_sbh_and_flat_inputs_give_the_same_tokens():
    layer = _layer()
    x = torch.randn(5, 2, HIDDEN)
    y3, _ = layer(x)
    y2, _ = layer(x.reshape(10, HIDDEN))
    assert y3.shape == x.shape and torch.equal(y3.reshape(10, HIDDEN), y2)


@pytest.mark.parametrize("compression", ["none", "lsh", "cast"])
def test_empty_input(compression):
    layer = _layer(a2a_compression=compression, capacity_factor=1.0, z_loss_coeff=0.1)
    y, x_grad, grads, losses = _run(layer, torch.zeros(0, HIDDEN))
    assert y.shape == (0, HIDDEN) and x_grad.shape == (0, HIDDEN)
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())
    assert layer.last_stats.rows == 0 and layer.last_stats.compression_rate == 1.0


@pytest.mark.parametrize("compression", ["none", "lsh"])
def test_all_tokens_to_one_expert(compression):
    layer = _layer(router_topk=1, a2a_compression=compression)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
    x = torch.randn(30, HIDDEN).abs() + 0.1
    y, x_grad, grads, _ = _run(layer, x)
    assert torch.isfinite(y).all() and layer.last_stats.rows == 30
    used = grads["experts.fc1_weight"].abs().sum((1, 2))
    assert used[2] > 0 and float(used[[0, 1, 3]].sum()) == 0.0


def test_capacity_dropped_rows_contribute_nothing():
    layer = _layer(router_topk=1, capacity_factor=0.5)
    x = torch.randn(40, HIDDEN)
    y, _ = layer(x)
    routing = layer.router(x)
    dropped = ~routing.kept_TK[:, 0]
    assert dropped.any() and layer.last_stats.dropped_rows == int(dropped.sum())
    assert torch.equal(y[dropped], torch.zeros_like(y[dropped]))


@pytest.mark.parametrize("cast_dtype,tol,byte_ratio", [("bf16", 2e-2, 0.5),
                                                       ("fp8", 1.5e-1, (HIDDEN + 4) / 64)])
def test_cast_is_close_to_none_and_sends_fewer_bytes(cast_dtype, tol, byte_ratio):
    x = torch.randn(50, HIDDEN)
    ref = _run(_layer(), x)
    layer = _layer("cast", {"dtype": cast_dtype})
    got = _run(layer, x)
    scale = ref[0].abs().max()
    assert (got[0] - ref[0]).abs().max() < tol * scale
    assert (got[1] - ref[1]).abs().max() < tol * ref[1].abs().max()
    ref_bytes = _layer()
    ref_bytes(x)
    assert layer.last_stats.bytes_fwd_total == int(ref_bytes.last_stats.bytes_fwd_total * byte_ratio)


def test_centered_cast_counts_each_experts_two_header_rows_in_the_bytes():
    x = torch.randn(50, HIDDEN) + 4.0                  # a component every row shares
    layer = _layer("cast", {"dtype": "fp8-centered"})
    got = _run(layer, x)
    routing = layer.router(x)
    experts_used = int((torch.bincount(routing.experts_TK.reshape(-1), minlength=4) > 0).sum())
    stats = layer.last_stats
    # One process: every row is sent and returned once; two header rows per non-empty expert.
    assert stats.bytes_fwd_total == 2 * (stats.sent_rows + 2 * experts_used) * (HIDDEN + 4)
    ref = _run(_layer(), x)
    plain = _run(_layer("cast", {"dtype": "fp8"}), x)
    err_centered = (got[0] - ref[0]).norm()
    assert err_centered < (plain[0] - ref[0]).norm() / 2
    assert (got[1] - ref[1]).norm() < 0.05 * ref[1].norm()


def test_stats_of_an_lsh_layer():
    layer = _layer("lsh", {"num_hashes": 2, "rotation_dim": 1, "compensation": "residual"})
    layer.timing = True
    y, _, _, _ = _run(layer, torch.randn(64, HIDDEN))
    stats = layer.last_stats
    assert stats.tokens == 64 and stats.rows == 128
    assert 0 < stats.sent_rows < stats.rows
    assert stats.compression_rate == stats.sent_rows / stats.rows
    row_bytes = 4 * HIDDEN
    assert stats.bytes_fwd_total == 2 * stats.sent_rows * row_bytes    # one process: no counts
    assert stats.bytes_fwd == stats.bytes_bwd == 0                     # nothing leaves the rank
    assert 0.0 < stats.mean_cosine < 1.0
    for stage in ("route", "project", "hash", "cluster", "restore", "experts", "compress_bwd",
                  "restore_bwd", "experts_bwd"):
        assert stats.ms[stage] >= 0.0, stage
    assert stats.overhead_ms > 0.0 and stats.overhead_cpu_ms >= 0.0
    assert set(stats.cpu_ms) == set(stats.ms)
    assert set(stats.as_dict()) >= {"rows", "sent_rows", "compression_rate", "bytes_fwd",
                                    "bytes_bwd", "mean_cosine", "ms"}


def test_stats_without_timing_have_no_stage_times():
    layer = _layer()
    layer(torch.randn(8, HIDDEN))
    assert layer.last_stats.ms == {} == layer.last_stats.cpu_ms
    assert layer.last_stats.mean_cosine == 1.0


def test_layer_is_deterministic_for_a_seed():
    x = torch.randn(20, HIDDEN)
    a = _run(_layer(a2a_compression="lsh"), x)
    b = _run(_layer(a2a_compression="lsh"), x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_meta_device_layer_and_reset_after_to_empty():
    cfg = MoEConfig(num_experts=8, a2a_compression="lsh")
    meta = MoELayer(cfg, HIDDEN, FFN, ProcessGroups.single(), seed=11, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    real = meta.to_empty(device="cpu")
    real.reset_parameters()
    ref = MoELayer(cfg, HIDDEN, FFN, ProcessGroups.single(), seed=11)
    for (name, a), b in zip(real.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


def test_experts_not_divisible_by_ep_is_one_clear_error():
    groups = ProcessGroups(ParallelDims(4, ep=4), 0, None, None, None, None, None, None, None,
                           [0], [0])
    with pytest.raises(ConfigError, match=r"--num-experts \(6\) is not divisible by "
                                          r"--expert-model-parallel-size \(4\)"):
        MoELayer(MoEConfig(num_experts=6), HIDDEN, FFN, groups)
