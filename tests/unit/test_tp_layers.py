"""Tensor-parallel layers, mappings and the RNG tracker in one process (TP size 1).

The multi-process equivalence with an unsharded reference lives in
tests/distributed/test_tp_layers.py; here: the single-rank maths, initialisation,
parameter attributes, meta-device construction, and the random-number machinery.
"""
import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_lsh.parallel import mappings
from megatron_lsh.parallel import random as mp_random
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                          VocabParallelEmbedding, build_layernorm,
                                          init_method_normal, parallel_lm_logits,
                                          scaled_init_method_normal, shard_master_weight,
                                          vocab_parallel_cross_entropy)
from megatron_lsh.parallel.random import RNGStatesTracker, checkpoint, model_parallel_seed

TOL = dict(rtol=1e-5, atol=1e-6)


# --- initialisation ---

def test_scaled_init_is_normal_with_std_over_sqrt_2l():
    a, b = torch.empty(64, 64), torch.empty(64, 64)
    scaled_init_method_normal(0.02, 8, torch.Generator().manual_seed(3))(a)
    init_method_normal(0.02 / 4.0, torch.Generator().manual_seed(3))(b)
    assert torch.equal(a, b)
    assert 0.004 < a.std().item() < 0.006


def test_layers_build_the_master_weight_from_the_default_generator():
    torch.manual_seed(7)
    col = ColumnParallelLinear(6, 10, init_method=init_method_normal(0.5))
    row = RowParallelLinear(10, 6, init_method=init_method_normal(0.1))
    emb = VocabParallelEmbedding(12, 6)
    torch.manual_seed(7)
    expected = [torch.empty(10, 6).normal_(0, 0.5), torch.empty(6, 10).normal_(0, 0.1),
                torch.empty(12, 6).normal_(0, 0.02)]
    for param, want in zip((col.weight, row.weight, emb.weight), expected):
        assert torch.equal(param.detach(), want)
    assert torch.count_nonzero(col.bias) == 0 and torch.count_nonzero(row.bias) == 0


def test_shard_master_weight_with_stride_keeps_matching_slices():
    master = torch.arange(16.0).view(16, 1)  # rows [gate(0..7); up(8..15)]
    shards = [shard_master_weight(master, 0, 4, r, stride=2) for r in range(4)]
    assert shards[1].flatten().tolist() == [2.0, 3.0, 10.0, 11.0]
    plain = [shard_master_weight(master, 0, 4, r) for r in range(4)]
    assert torch.equal(torch.cat(plain), master)
    with pytest.raises(ValueError, match="not divisible"):
        shard_master_weight(master, 0, 3, 0)


def test_parameter_attributes():
    col = ColumnParallelLinear(8, 8, stride=2)
    row = RowParallelLinear(8, 8, sequence_parallel=True)
    emb = VocabParallelEmbedding(16, 8)
    for p, dim, stride in ((col.weight, 0, 2), (col.bias, 0, 2), (row.weight, 1, 1),
                           (emb.weight, 0, 1)):
        assert (p.tensor_model_parallel, p.partition_dim, p.partition_stride) == (True, dim,
                                                                                  stride)
    assert not hasattr(row.bias, "tensor_model_parallel")
    assert row.bias.sequence_parallel is True
    assert RowParallelLinear(8, 8).bias.sequence_parallel is False


def test_build_layernorm_falls_back_to_torch_and_marks_sequence_parallel():
    norm = build_layernorm(8, 1e-6, sequence_parallel=True)
    assert isinstance(norm, nn.LayerNorm) and norm.eps == 1e-6
    assert all(p.sequence_parallel for p in norm.parameters())
    assert not any(p.sequence_parallel for p in build_layernorm(8).parameters())


def test_meta_construction_allocates_nothing_and_skips_init():
    def forbidden(_):
        raise AssertionError("init_method must not run on the meta device")
    # ~50B parameters' worth: impossible to allocate here, instant on meta.
    col = ColumnParallelLinear(100_000, 250_000, init_method=forbidden, device="meta")
    row = RowParallelLinear(250_000, 100_000, init_method=forbidden, device="meta")
    emb = VocabParallelEmbedding(1_000_000, 4096, init_method=forbidden, device="meta")
    norm = build_layernorm(4096, device="meta")
    params = [*col.parameters(), *row.parameters(), *emb.parameters(), *norm.parameters()]
    assert all(p.is_meta for p in params)
    assert col.weight.shape == (250_000, 100_000) and row.weight.shape == (100_000, 250_000)
    assert emb.weight.shape == (1_000_000, 4096) and col.bias.shape == (250_000,)
    assert sum(p.numel() for p in params) == 2 * 25_000_000_000 + 350_000 + 4_096_000_000 + 8192


def test_meta_then_to_empty_and_reset_equals_eager_construction():
    torch.manual_seed(1)
    eager = ColumnParallelLinear(4, 6)
    lazy = ColumnParallelLinear(4, 6, device="meta").to_empty(device="cpu")
    torch.manual_seed(1)
    lazy.reset_parameters()
    assert torch.equal(lazy.weight, eager.weight) and torch.equal(lazy.bias, eager.bias)


# --- layers with TP size 1 against torch ---

def test_linear_layers_match_torch_and_return_bias_when_skipped():
    torch.manual_seed(0)
    col = ColumnParallelLinear(6, 10, gather_output=True)
    row = RowParallelLinear(10, 6, input_is_parallel=False, skip_bias_add=True)
    with torch.no_grad():
        col.bias.normal_()
        row.bias.normal_()
    x = torch.randn(3, 2, 6, requires_grad=True)
    hidden, none_bias = col(x)
    out, bias = row(hidden)
    assert none_bias is None and bias is row.bias
    x_ref = x.detach().clone().requires_grad_()
    w1, b1, w2 = (t.detach().clone().requires_grad_() for t in (col.weight, col.bias, row.weight))
    ref = F.linear(F.linear(x_ref, w1, b1), w2)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for got, want in ((x.grad, x_ref.grad), (col.weight.grad, w1.grad), (col.bias.grad, b1.grad),
                      (row.weight.grad, w2.grad)):
        torch.testing.assert_close(got, want, **TOL)


def test_embedding_and_tied_logits_match_torch():
    torch.manual_seed(0)
    emb = VocabParallelEmbedding(20, 8)
    ids = torch.randint(0, 20, (2, 5))
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight), **TOL)
    # Sequence-parallel layout: sequence-first, whatever the TP size.
    emb_sp = VocabParallelEmbedding(20, 8, reduce_scatter_embeddings=True)
    emb_sp.load_state_dict(emb.state_dict())
    torch.testing.assert_close(emb_sp(ids), F.embedding(ids, emb.weight).transpose(0, 1), **TOL)
    hidden = torch.randn(5, 2, 8)
    torch.testing.assert_close(parallel_lm_logits(hidden, emb.weight, None),
                               hidden @ emb.weight.t(), **TOL)


def test_cross_entropy_matches_torch_value_and_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(4, 3, 11) * 20).requires_grad_()  # large: stability matters
    target = torch.randint(0, 11, (4, 3))
    weights = torch.rand(4, 3)
    loss = vocab_parallel_cross_entropy(logits, target)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 11), target.view(-1), reduction="none").view(4, 3)
    torch.testing.assert_close(loss, ref, **TOL)
    (loss * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, **TOL)


def test_cross_entropy_label_smoothing_is_megatrons_form():
    torch.manual_seed(0)
    vocab, ls = 9, 0.1
    logits = torch.randn(6, vocab, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, vocab, (6,))
    # The target keeps 1 - ls of the mass, the other V - 1 ids share ls.
    soft = torch.full((6, vocab), ls / (vocab - 1), dtype=torch.float64)
    soft[torch.arange(6), target] = 1 - ls
    ref = -(soft * F.log_softmax(logits, -1)).sum(-1)
    loss = vocab_parallel_cross_entropy(logits, target, None, ls)
    torch.testing.assert_close(loss, ref)
    weights = torch.rand(6, dtype=torch.float64)
    grad, = torch.autograd.grad((loss * weights).sum(), logits)
    ref_grad, = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(grad, ref_grad)
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(logits, target, None, 1.0)


def test_cross_entropy_half_precision_logits_and_single_backward():
    logits = torch.randn(5, 7, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 7, (5,))
    loss = vocab_parallel_cross_entropy(logits, target)
    assert loss.dtype == torch.float32
    loss.sum().backward(retain_graph=True)
    assert logits.grad.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="only once"):
        loss.sum().backward()


def test_mappings_are_identity_without_a_group():
    x = torch.randn(4, 6)
    for fn in (mappings.copy_to_tensor_parallel_region, mappings.reduce_from_tensor_parallel_region,
               mappings.scatter_to_tensor_parallel_region,
               mappings.gather_from_tensor_parallel_region,
               mappings.scatter_to_sequence_parallel_region,
               mappings.gather_from_sequence_parallel_region,
               mappings.reduce_scatter_to_sequence_parallel_region):
        assert fn(x, None) is x
    assert mappings.group_size(None) == 1 and mappings.group_rank(None) == 0


def test_invalid_layouts_are_refused():
    with pytest.raises(ValueError, match="sequence parallelism"):
        ColumnParallelLinear(4, 4, gather_output=True, sequence_parallel=True)
    with pytest.raises(ValueError, match="input_is_parallel"):
        RowParallelLinear(4, 4, input_is_parallel=False, sequence_parallel=True)


# --- RNG tracker ---

def _draw(n=8):
    return torch.rand(n)


def test_fork_uses_its_own_stream_and_leaves_the_default_one_untouched():
    tracker = RNGStatesTracker()
    tracker.add("tp", 99)
    torch.manual_seed(5)
    a, b = _draw(), _draw()
    torch.manual_seed(5)
    a2 = _draw()
    with tracker.fork("tp"):
        inside1 = _draw()
    with tracker.fork("tp"):
        inside2 = _draw()  # the stream continues where the last fork left it
    b2 = _draw()
    assert torch.equal(a, a2) and torch.equal(b, b2)
    stream = torch.Generator().manual_seed(99)
    assert torch.equal(inside1, torch.rand(8, generator=stream))
    assert torch.equal(inside2, torch.rand(8, generator=stream))


def test_fork_restores_the_default_stream_on_exceptions():
    tracker = RNGStatesTracker()
    tracker.add("tp", 1)
    torch.manual_seed(5)
    expected = _draw()
    torch.manual_seed(5)
    with pytest.raises(ZeroDivisionError):
        with tracker.fork("tp"):
            _draw()
            1 / 0
    assert torch.equal(_draw(), expected)


def test_tracker_refuses_duplicates_and_unknown_streams():
    tracker = RNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match="seed 1"):
        tracker.add("b", 1)
    with pytest.raises(KeyError, match="does not exist"):
        with tracker.fork("c"):
            pass
    tracker.reset()
    assert tracker.names == []


def test_model_parallel_seed_single_process():
    tracker = RNGStatesTracker()
    model_parallel_seed(42, ProcessGroups.single(), tracker)
    seeded = _draw()
    with tracker.fork():
        forked = _draw()
    torch.manual_seed(42)
    assert torch.equal(seeded, _draw())
    assert torch.equal(forked, torch.rand(8, generator=torch.Generator().manual_seed(42 + 2718)))
    assert tracker.names == [mp_random.MODEL_PARALLEL_RNG]


def test_rng_state_dict_round_trip_through_a_weights_only_checkpoint():
    tracker = RNGStatesTracker()
    model_parallel_seed(3, ProcessGroups.single(), tracker)

    def draws():
        with tracker.fork():
            forked = torch.rand(4)
        return (random.random(), np.random.rand(), torch.rand(4), forked)

    draws()  # move every stream away from its seed
    buffer = io.BytesIO()
    torch.save(mp_random.state_dict(tracker), buffer)
    first = draws()
    draws()
    buffer.seek(0)
    mp_random.load_state_dict(torch.load(buffer, weights_only=True), tracker)
    again = draws()
    assert first[:2] == again[:2]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


class _DropoutBlock(nn.Module):
    """Linear -> dropout on the tracker stream -> linear -> dropout on the default stream."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        with self.tracker.fork():
            h = F.dropout(torch.tanh(self.a(x)), 0.5, training=True)
        return F.dropout(self.b(h), 0.5, training=True)


@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_checkpoint_replays_dropout_and_gives_the_same_gradients(input_requires_grad):
    tracker = RNGStatesTracker()
    model_parallel_seed(11, ProcessGroups.single(), tracker)
    block = _DropoutBlock(tracker)
    x = torch.randn(16, 8, requires_grad=input_requires_grad)
    start = mp_random.state_dict(tracker)

    def run(use_checkpoint):
        mp_random.load_state_dict(start, tracker)
        block.zero_grad()
        x.grad = None
        out = checkpoint(block, x, tracker=tracker) if use_checkpoint else block(x)
        (out * torch.arange(8.0)).sum().backward()
        after = (torch.rand(3), tracker.get_states())  # streams after the whole step
        return out.detach(), [p.grad.clone() for p in block.parameters()], x.grad, after

    plain, ckpt = run(False), run(True)
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    for got, want in zip(ckpt[1], plain[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if input_requires_grad:
        torch.testing.assert_close(ckpt[2], plain[2], rtol=0, atol=0)
    # The recompute did not advance any stream: the next draws are the same as without it.
    assert torch.equal(ckpt[3][0], plain[3][0])
    name = mp_random.MODEL_PARALLEL_RNG
    assert torch.equal(ckpt[3][1][name]["cpu"], plain[3][1][name]["cpu"])
