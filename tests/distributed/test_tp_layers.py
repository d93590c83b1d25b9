"""Tensor-parallel layers on 2 and 4 gloo processes against the unsharded torch reference.

One spawn per TP size runs every check on every rank (process start-up dominates the cost)
and returns ``(label, actual, expected, exact)`` tuples; the tests below assert them per
check. Each check builds the same block twice from the same seed: once unsharded (the
reference weights, used through plain torch functions) and once over the TP group. It then
verifies that the TP shards are slices of the same master weights, loads the reference's
values (with biases and norms perturbed so that they matter), and compares the forward
output and every gradient (inputs and parameters, shards gathered through their
``partition_dim`` / ``partition_stride`` attributes) in fp32.

Layouts: ``rep`` = replicated on the TP ranks, ``seq`` = this rank's slice of dim 0
(sequence parallel), ``last`` = this rank's slice of the last dim (TP-split features).
"""
import math
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lsh.parallel import mappings as M
from megatron_lsh.parallel import random as mp_random
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups
from megatron_lsh.parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                          VocabParallelEmbedding, build_layernorm,
                                          gather_master_weight, parallel_lm_logits,
                                          scaled_init_method_normal, shard_master_weight,
                                          vocab_parallel_cross_entropy)
from megatron_lsh.parallel.spawn import run_distributed

S, B, H, FFN, HEADS, V = 8, 2, 16, 64, 4, 32
SEED = 1234
TOL = dict(rtol=1e-5, atol=1e-6)


# --- blocks built from the TP layers, and their plain-torch references ---

def attention_core(qkv, heads, dropout=0.0, tracker=None):
    """Softmax attention of ``heads`` heads; qkv is [s, b, 3 * heads * d] laid out [q; k; v]."""
    s, b, _ = qkv.shape
    q, k, v = (t.reshape(s, b, heads, -1).permute(1, 2, 0, 3) for t in qkv.chunk(3, dim=-1))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    if dropout > 0:
        with tracker.fork():  # probabilities are split by head over TP: per-rank masks
            probs = F.dropout(probs, dropout, training=True)
    return (probs @ v).permute(2, 0, 1, 3).reshape(s, b, -1)


class Attention(nn.Module):
    """Pre-norm self-attention: fused QKV (column, stride 3) -> heads -> projection (row)."""

    def __init__(self, group, sp=False, dropout=0.0, tracker=None):
        super().__init__()
        self.norm = build_layernorm(H, 1e-5, sp)
        self.qkv = ColumnParallelLinear(H, 3 * H, tp_group=group, stride=3, sequence_parallel=sp)
        self.proj = RowParallelLinear(H, H, tp_group=group, sequence_parallel=sp,
                                      init_method=scaled_init_method_normal(0.02, 2))
        self.heads, self.dropout, self.tracker = HEADS // M.group_size(group), dropout, tracker

    def forward(self, x):
        qkv, _ = self.qkv(self.norm(x))
        out, _ = self.proj(attention_core(qkv, self.heads, self.dropout, self.tracker))
        return x + out


def ref_attention(m, x):
    qkv = F.linear(F.layer_norm(x, (H,), m.norm.weight, m.norm.bias, 1e-5), m.qkv.weight,
                   m.qkv.bias)
    return x + F.linear(attention_core(qkv, HEADS), m.proj.weight, m.proj.bias)


class MLP(nn.Module):
    """Pre-norm MLP: column -> gelu -> row, plus the residual."""

    def __init__(self, group, sp=False):
        super().__init__()
        self.norm = build_layernorm(H, 1e-5, sp)
        self.fc1 = ColumnParallelLinear(H, FFN, tp_group=group, sequence_parallel=sp)
        self.fc2 = RowParallelLinear(FFN, H, tp_group=group, sequence_parallel=sp,
                                     init_method=scaled_init_method_normal(0.02, 2))

    def forward(self, x):
        hidden, _ = self.fc1(self.norm(x))
        out, _ = self.fc2(F.gelu(hidden))
        return x + out


def ref_mlp(m, x):
    hidden = F.linear(F.layer_norm(x, (H,), m.norm.weight, m.norm.bias, 1e-5), m.fc1.weight,
                      m.fc1.bias)
    return x + F.linear(F.gelu(hidden), m.fc2.weight, m.fc2.bias)


class TiedLogits(nn.Module):
    """The output layer tied to a vocab-parallel embedding table."""

    def __init__(self, group, gather_output=False):
        super().__init__()
        self.emb = VocabParallelEmbedding(V, H, tp_group=group)
        self.group, self.gather_output = group, gather_output

    def forward(self, hidden):
        return parallel_lm_logits(hidden, self.emb.weight, self.group,
                                  gather_output=self.gather_output)


def _targets():
    return torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(9))


class TinyLM(nn.Module):
    """Embedding -> attention -> MLP -> norm -> tied logits -> per-token loss [s, b]."""

    def __init__(self, group, sp=False):
        super().__init__()
        self.emb = VocabParallelEmbedding(V, H, tp_group=group, reduce_scatter_embeddings=sp)
        self.attn, self.mlp = Attention(group, sp), MLP(group, sp)
        self.norm = build_layernorm(H, 1e-5, sp)
        self.group, self.sp = group, sp

    def forward(self, ids):
        hidden = self.emb(ids)
        hidden = hidden if self.sp else hidden.transpose(0, 1)
        hidden = self.norm(self.mlp(self.attn(hidden)))
        logits = parallel_lm_logits(hidden, self.emb.weight, self.group, self.sp)
        return vocab_parallel_cross_entropy(logits, _targets(), self.group)


def ref_tiny_lm(m, ids):
    hidden = F.embedding(ids, m.emb.weight).transpose(0, 1)
    hidden = ref_mlp(m.mlp, ref_attention(m.attn, hidden))
    hidden = F.layer_norm(hidden, (H,), m.norm.weight, m.norm.bias, 1e-5)
    logits = hidden @ m.emb.weight.t()
    return F.cross_entropy(logits.reshape(-1, V), _targets().reshape(-1),
                           reduction="none").view(S, B)


# --- helpers ---

def _local(t, layout, group):
    if layout == "rep":
        return t
    dim = 0 if layout == "seq" else -1
    return t.chunk(M.group_size(group), dim=dim)[M.group_rank(group)]


def _shard(full, param, group):
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return shard_master_weight(full, param.partition_dim, M.group_size(group),
                               M.group_rank(group), param.partition_stride)


def _full_grad(param, group):
    if not getattr(param, "tensor_model_parallel", False):
        return param.grad
    return gather_master_weight(param.grad, group, param.partition_dim, param.partition_stride)


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _equivalence(label, make, ref_forward, group, x_full, in_layout="rep", out_layout="rep"):
    """Compare a TP block with its unsharded reference: init, forward, every gradient."""
    torch.manual_seed(SEED)
    ref = make(None)
    torch.manual_seed(SEED)
    mod = make(group)
    items = []
    params, ref_params = list(mod.named_parameters()), list(ref.named_parameters())
    assert [n for n, _ in params] == [n for n, _ in ref_params]
    for (name, p), (_, q) in zip(params, ref_params):
        items.append((f"{label}: initial {name} is a shard of the master", p.detach().clone(),
                      _shard(q.detach(), p, group).clone(), True))
    with torch.no_grad():  # biases start at 0 and norms at 1: perturb them so they matter
        for i, (_, q) in enumerate(ref_params):
            if q.dim() == 1:
                q.add_(0.5 * _randn(q.shape, 100 + i))
        for (_, p), (_, q) in zip(params, ref_params):
            p.copy_(_shard(q, p, group))

    floating = x_full.is_floating_point()
    x_ref = x_full.clone().requires_grad_(floating)
    x = _local(x_full, in_layout, group).clone().requires_grad_(floating)
    out_ref, out = ref_forward(ref, x_ref), mod(x)
    out = out[0] if isinstance(out, tuple) else out
    # Detached: a returned graph would keep its TP group (held by the autograd nodes) alive.
    items.append((f"{label}: output", out.detach(), _local(out_ref, out_layout, group).detach(),
                  False))
    grad_out = _randn(out_ref.shape, 7)
    out_ref.backward(grad_out)
    out.backward(_local(grad_out, out_layout, group))
    if floating:
        items.append((f"{label}: input grad", x.grad, _local(x_ref.grad, in_layout, group),
                      False))
    # What the data-parallel gradient sync does for sequence-parallel parameters.
    for _, p in params:
        if getattr(p, "sequence_parallel", False) and group is not None:
            dist.all_reduce(p.grad, group=group)
    for (name, p), (_, q) in zip(params, ref_params):
        items.append((f"{label}: grad {name}", _full_grad(p, group), q.grad, False))
    return items


def _x():
    return _randn((S, B, H), 3)


def _ids():
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(4))


def _linear_ref(m, x):
    return F.linear(x, m.weight, m.bias)


# --- the checks (each returns a list of (label, actual, expected, exact)) ---

def check_mappings(group):
    """Each collective and its conjugate on rank-dependent tensors with known sums."""
    tp, rank = M.group_size(group), M.group_rank(group)
    base = torch.arange(float(tp * 2 * 3)).view(tp * 2, 3) + 1

    def x_of(r):
        return base * (r + 1)

    def g_of(r, shape):
        return torch.full(shape, 10.0 ** r)

    items = []

    def run(name, fn, x, want_out, want_grad):
        x = x.clone().requires_grad_()
        out = fn(x)
        out.backward(g_of(rank, out.shape))
        # Detached: the graph would keep the group alive (its autograd nodes hold it).
        items.extend([(f"{name} forward", out.detach(), want_out, True),
                      (f"{name} backward", x.grad, want_grad, True)])

    total = sum(x_of(r) for r in range(tp))
    grad_sum = sum(g_of(r, base.shape) for r in range(tp))
    run("copy_to", partial(M.copy_to_tensor_parallel_region, group=group), x_of(rank),
        x_of(rank), grad_sum)
    run("reduce_from", partial(M.reduce_from_tensor_parallel_region, group=group), x_of(rank),
        total, g_of(rank, base.shape))
    wide = torch.cat([x_of(0)] * tp, dim=-1)
    run("scatter_to_tp", partial(M.scatter_to_tensor_parallel_region, group=group), wide,
        x_of(0), torch.cat([g_of(r, base.shape) for r in range(tp)], dim=-1))
    run("gather_from_tp", partial(M.gather_from_tensor_parallel_region, group=group),
        x_of(rank), torch.cat([x_of(r) for r in range(tp)], dim=-1),
        g_of(rank, base.shape))
    rows = base.shape[0] // tp
    run("scatter_to_sp", partial(M.scatter_to_sequence_parallel_region, group=group), base,
        base[rank * rows:(rank + 1) * rows], torch.cat([g_of(r, (rows, 3)) for r in range(tp)]))
    gathered = torch.cat([x_of(r) for r in range(tp)])
    run("gather_from_sp", partial(M.gather_from_sequence_parallel_region, group=group),
        x_of(rank), gathered, torch.full(base.shape, sum(10.0 ** r for r in range(tp))))
    # With an identical gradient on every rank the backward only splits.
    run("gather_from_sp(split grad)",
        lambda x: M.gather_from_sequence_parallel_region(x, group, False) * 1.0,
        x_of(rank), gathered, g_of(rank, base.shape))
    run("reduce_scatter_to_sp", partial(M.reduce_scatter_to_sequence_parallel_region,
                                        group=group),
        x_of(rank), total[rank * rows:(rank + 1) * rows],
        torch.cat([g_of(r, (rows, 3)) for r in range(tp)]))
    return items


def check_column(group):
    items = []
    for gather in (False, True):
        items += _equivalence(
            f"column gather_output={gather}",
            lambda g: ColumnParallelLinear(H, FFN, tp_group=g, gather_output=gather),
            _linear_ref, group, _x(), out_layout="rep" if gather else "last")
    items += _equivalence(
        "column sequence_parallel",
        lambda g: ColumnParallelLinear(H, FFN, tp_group=g, sequence_parallel=True),
        _linear_ref, group, _x(), in_layout="seq", out_layout="last")
    return items


def check_row(group):
    items = []
    for parallel_in in (True, False):
        items += _equivalence(
            f"row input_is_parallel={parallel_in}",
            lambda g: RowParallelLinear(FFN, H, tp_group=g, input_is_parallel=parallel_in),
            _linear_ref, group, _randn((S, B, FFN), 5), in_layout="last" if parallel_in else "rep")
    items += _equivalence(
        "row sequence_parallel",
        lambda g: RowParallelLinear(FFN, H, tp_group=g, sequence_parallel=True),
        _linear_ref, group, _randn((S, B, FFN), 5), in_layout="last", out_layout="seq")
    return items


def check_embedding(group):
    return (_equivalence("embedding", lambda g: VocabParallelEmbedding(V, H, tp_group=g),
                         lambda m, ids: F.embedding(ids, m.weight), group, _ids())
            + _equivalence("embedding reduce-scattered",
                           lambda g: VocabParallelEmbedding(V, H, tp_group=g,
                                                            reduce_scatter_embeddings=True),
                           lambda m, ids: F.embedding(ids, m.weight).transpose(0, 1),
                           group, _ids(), out_layout="seq"))


def check_cross_entropy(group):
    items = []
    logits_full = _randn((S, B, V), 6) * 8
    target = _targets()
    weights = torch.rand(S, B, generator=torch.Generator().manual_seed(8))
    for smoothing in (0.0, 0.1):
        ref_logits = logits_full.clone().requires_grad_()
        soft = torch.full((S, B, V), smoothing / (V - 1))
        soft.scatter_(-1, target.unsqueeze(-1), 1.0 - smoothing)
        ref = -(soft * F.log_softmax(ref_logits, dim=-1)).sum(-1)
        logits = _local(logits_full, "last", group).clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(logits, target, group, smoothing)
        (ref * weights).sum().backward()
        (loss * weights).sum().backward()
        items += [(f"cross entropy smoothing={smoothing}: loss", loss, ref, False),
                  (f"cross entropy smoothing={smoothing}: grad", logits.grad,
                   _local(ref_logits.grad, "last", group), False)]
    return items


def check_lm_logits(group):
    items = []
    for gather in (False, True):
        items += _equivalence(f"lm logits gather_output={gather}",
                              lambda g: TiedLogits(g, gather),
                              lambda m, h: h @ m.emb.weight.t(), group, _x(),
                              out_layout="rep" if gather else "last")
    return items


def check_mlp(group):
    return (_equivalence("mlp", lambda g: MLP(g), ref_mlp, group, _x())
            + _equivalence("mlp sequence_parallel", lambda g: MLP(g, sp=True), ref_mlp, group,
                           _x(), in_layout="seq", out_layout="seq"))


def check_attention(group):
    return (_equivalence("attention", lambda g: Attention(g), ref_attention, group, _x())
            + _equivalence("attention sequence_parallel", lambda g: Attention(g, sp=True),
                           ref_attention, group, _x(), in_layout="seq", out_layout="seq"))


def check_tiny_lm(group):
    return (_equivalence("tiny lm", lambda g: TinyLM(g), ref_tiny_lm, group, _ids())
            + _equivalence("tiny lm sequence_parallel", lambda g: TinyLM(g, sp=True),
                           ref_tiny_lm, group, _ids()))


def check_meta(group):
    tp = M.group_size(group)
    col = ColumnParallelLinear(H, 4096 * 64, tp_group=group, device="meta")
    row = RowParallelLinear(4096 * 64, H, tp_group=group, device="meta")
    emb = VocabParallelEmbedding(V * 1024, H, tp_group=group, device="meta")
    shapes = torch.tensor([*col.weight.shape, *col.bias.shape, *row.weight.shape,
                           *row.bias.shape, *emb.weight.shape])
    want = torch.tensor([4096 * 64 // tp, H, 4096 * 64 // tp, H, 4096 * 64 // tp, H,
                         V * 1024 // tp, H])
    all_meta = torch.tensor([all(p.is_meta for m in (col, row, emb) for p in m.parameters())])
    return [("meta shard shapes", shapes, want, True),
            ("meta parameters", all_meta, torch.tensor([True]), True)]


def check_checkpointed_dropout(group, groups):
    """Under TP, checkpointing attention with forked dropout repeats the plain run exactly."""
    tracker = mp_random.model_parallel_seed(SEED, groups)
    block = Attention(group, dropout=0.5, tracker=tracker)
    start = mp_random.state_dict(tracker)

    def run(use_checkpoint):
        mp_random.load_state_dict(start, tracker)
        block.zero_grad()
        x = _x().requires_grad_()
        out = mp_random.checkpoint(block, x) if use_checkpoint else block(x)
        out.backward(_randn(out.shape, 7))
        return [out.detach(), x.grad] + [p.grad for p in block.parameters()]

    plain, ckpt = run(False), run(True)
    return [(f"checkpointed dropout tensor {i}", c, p, True)
            for i, (c, p) in enumerate(zip(ckpt, plain))]


CHECKS = ["mappings", "column", "row", "embedding", "cross_entropy", "lm_logits", "mlp",
          "attention", "tiny_lm", "meta", "checkpointed_dropout"]


def _rng_masks(groups):
    """Dropout masks inside and outside the tracker's fork after model_parallel_seed."""
    tracker = mp_random.model_parallel_seed(SEED, groups)
    with tracker.fork():
        inside = F.dropout(torch.ones(256), 0.5, training=True) > 0
    outside = F.dropout(torch.ones(256), 0.5, training=True) > 0
    return {"tp_rank": groups.tp_rank, "dp_rank": groups.dp_rank, "inside": inside,
            "outside": outside}


def worker(rank, world_size):
    """All checks with tp = world_size; on 4 ranks also the RNG layout tp=2 x dp=2."""
    groups = ProcessGroups.build(ParallelDims(world_size, tp=world_size))
    results = {}
    for name in CHECKS:
        check = globals()[f"check_{name}"]
        results[name] = (check(groups.tp, groups) if name == "checkpointed_dropout"
                         else check(groups.tp))
    rng = None
    if world_size == 4:
        rng = _rng_masks(ProcessGroups.build(ParallelDims(4, tp=2)))
    return {"checks": results, "rng": rng}


_RESULTS = {}


def _results(tp):
    if tp not in _RESULTS:
        _RESULTS[tp] = run_distributed(worker, tp, timeout=240)
    return _RESULTS[tp]


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_unsharded_reference(tp, check):
    per_rank = _results(tp)
    for rank, result in enumerate(per_rank):
        items = result["checks"][check]
        assert items, f"check {check} produced nothing"
        for label, actual, expected, exact in items:
            tol = dict(rtol=0, atol=0) if exact else TOL
            torch.testing.assert_close(actual, expected, **tol,
                                       msg=lambda m: f"tp={tp} rank {rank} {label}: {m}")


def test_dropout_masks_follow_the_tp_and_dp_layout():
    masks = [r["rng"] for r in _results(4)]
    by_coord = {(m["dp_rank"], m["tp_rank"]): m for m in masks}
    assert sorted(by_coord) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for dp in (0, 1):
        # Inside fork: each TP rank its own mask ...
        assert not torch.equal(by_coord[dp, 0]["inside"], by_coord[dp, 1]["inside"])
    for tp in (0, 1):
        # ... and the same one on its data-parallel partner.
        assert torch.equal(by_coord[0, tp]["inside"], by_coord[1, tp]["inside"])
    # Outside: one mask everywhere (replicated activations stay replicated).
    for m in masks[1:]:
        assert torch.equal(m["outside"], masks[0]["outside"])
