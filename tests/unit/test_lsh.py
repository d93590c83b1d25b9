"""LSH compression: hashing, bucket keys, clustering, restore, gradients, rotations, real text."""
from pathlib import Path

import pytest
import torch

from megatron_lsh.config import MoEConfig
from megatron_lsh.moe import MoELayer
from megatron_lsh.moe.compressors import Rows, compression, weighted_sum_into_tokens
from megatron_lsh.moe.compressors import lsh_ops as lsh
from megatron_lsh.moe.compressors.lsh import LSHCompressor, LSHOptions
from megatron_lsh.moe.compressors.none import NoCompression
from megatron_lsh.moe.dispatcher import AllToAllDispatcher
from megatron_lsh.moe.experts import GroupedExperts
from megatron_lsh.moe.router import Routing
from megatron_lsh.moe.stats import StageTimer
from megatron_lsh.moe.text_states import text_states
from megatron_lsh.parallel.dims import ProcessGroups

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "moe" / "hamlet_act1_scene1.txt"


def _sorted_rows(num_rows, hidden, num_experts, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, hidden, generator=gen, dtype=dtype)
    experts = torch.sort(torch.randint(0, num_experts, (num_rows,), generator=gen)).values
    return x, experts


def _rows(x, experts, num_experts, gates=None):
    """A Rows batch where each row is its own token (k = 1)."""
    n = x.shape[0]
    gates = torch.ones(n, dtype=x.dtype) if gates is None else gates
    return Rows(x, experts, torch.arange(n), gates, torch.bincount(experts, minlength=num_experts),
                torch.arange(n), 1)


def test_cross_polytope_codes_follow_the_definition():
    x, _ = _sorted_rows(200, 32, 1)
    L, m = 5, 3
    rot = lsh.draw_rotations(32, L, m, seed=3)
    codes, radices = lsh.hash_codes(x, rot, L, m, "cross_polytope")
    proj = (x @ rot).view(200, L, m)
    expected = torch.cat([proj, -proj], dim=-1).argmax(-1)
    assert torch.equal(codes, expected)
    assert radices == [2 * m] * L and int(codes.max()) < 2 * m


def test_spherical_plane_codes_are_sign_bits_packed_in_words():
    x, _ = _sorted_rows(100, 64, 1)
    L, m = 2, 40  # 40 bits per function: two words of 31 + 9 bits
    rot = lsh.draw_rotations(64, L, m, seed=1)
    codes, radices = lsh.hash_codes(x, rot, L, m, "spherical_plane")
    assert codes.shape == (100, 4) and radices == [2 ** 31, 2 ** 9] * 2
    bits = ((x @ rot).view(100, L, m) > 0).long()
    low = (bits[..., :31] * 2 ** torch.arange(31)).sum(-1)
    high = (bits[..., 31:] * 2 ** torch.arange(9)).sum(-1)
    assert torch.equal(codes, torch.stack([low, high], -1).reshape(100, 4))


def test_rotations_are_seeded_and_orthonormal_per_function():
    a = lsh.draw_rotations(48, 4, 3, seed=11)
    assert torch.equal(a, lsh.draw_rotations(48, 4, 3, seed=11))
    assert not torch.equal(a, lsh.draw_rotations(48, 4, 3, seed=12))
    blocks = a.view(48, 4, 3).permute(1, 0, 2)
    gram = blocks.transpose(1, 2) @ blocks
    assert torch.allclose(gram, torch.eye(3).expand(4, 3, 3), atol=1e-5)


def test_bucket_ids_never_collide_when_keys_need_more_than_64_bits():
    # L = 10 cross-polytope codes with m = 64: 10 * 7 = 70 bits, plus the expert column.
    radices = [8] + [128] * 10
    assert lsh.radix_bits(radices) > 64
    gen = torch.Generator().manual_seed(0)
    columns = torch.stack([torch.randint(0, r, (500,), generator=gen) for r in radices], 1)
    columns[250:] = columns[:250]                       # guaranteed duplicates
    columns[100, 1] = (columns[100, 1] + 1) % 128       # differs only in the top code
    ids, num = lsh.bucket_ids(columns, radices)
    uniq, expected = torch.unique(columns, dim=0, return_inverse=True)
    assert num == uniq.shape[0] and torch.equal(ids, expected)

    # A naive int64 radix key wraps around and merges two different rows.
    a = torch.tensor([[0, 1] + [0] * 9])
    b = torch.tensor([[0, 0] + [0] * 9])
    a[0, 1], b[0, 1] = 64, 0                            # 64 * 128^9 = 2^69 = 0 mod 2^64
    pair = torch.cat([a, b])
    naive = torch.zeros(2, dtype=torch.int64)
    for w, r in enumerate(radices):
        naive = naive * r + pair[:, w]
    assert naive[0] == naive[1]
    ids, num = lsh.bucket_ids(pair, radices)
    assert num == 2 and ids[0] != ids[1]


def test_clusters_group_rows_of_one_expert_by_key_in_first_row_order():
    experts = torch.tensor([0, 0, 0, 1, 1, 2])
    codes = torch.tensor([[3], [1], [3], [3], [3], [0]])
    clusters = lsh.cluster_rows(experts, codes, [4], num_experts=4)
    assert clusters.cluster_of_row.tolist() == [0, 1, 0, 2, 2, 3]
    assert clusters.rows_per_cluster.tolist() == [2, 1, 2, 1]
    assert clusters.centroids_per_expert.tolist() == [2, 1, 1, 0]


def test_segment_mean_gives_each_row_grad_over_n():
    x = torch.randn(5, 3, requires_grad=True)
    clusters = lsh.cluster_rows(torch.zeros(5, dtype=torch.long),
                                torch.tensor([[0], [1], [0], [0], [1]]), [2], 1)
    centroids = lsh.segment_mean(x, clusters)
    assert torch.allclose(centroids[0], x[[0, 2, 3]].mean(0))
    centroids.backward(torch.ones_like(centroids))
    assert torch.allclose(x.grad[:, 0], torch.tensor([1 / 3, 1 / 2, 1 / 3, 1 / 3, 1 / 2]))


def _lsh(hidden, num_experts, **options):
    return LSHCompressor(LSHOptions(**options), hidden_size=hidden, num_experts=num_experts)


def _restore(payload, context, compensation="residual"):
    """Every row's expert output rebuilt from its centroid's (the row-major reference)."""
    return lsh.restore(context.rows.rows_RH, context.centroids_CH, payload, context.clusters,
                       compensation != "none")


def _dispatch(x_TH, routing, experts, compressor, with_stats=False):
    out, stats = AllToAllDispatcher(experts.num_experts, None, compressor)(x_TH, routing, experts)
    return (out, stats) if with_stats else out


@pytest.mark.parametrize("compensation", ["residual", "scaled", "linear", "none"])
def test_lsh_with_singleton_clusters_equals_no_compression_exactly(compensation):
    """Enough hash bits that every row is its own cluster: centroids are the rows."""
    hidden, num_experts = 16, 4
    experts = GroupedExperts(num_experts, hidden, 32, seed=5)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(40, hidden, generator=gen)
    routing = Routing(torch.rand(40, 2, generator=gen), torch.stack(
        [torch.randint(0, 2, (40,), generator=gen), torch.randint(2, 4, (40,), generator=gen)],
        1), None, None, None)
    comp = _lsh(hidden, num_experts, num_hashes=10, rotation_dim=64,
                         compensation=compensation)
    results = []
    for compressor in (NoCompression(), comp):
        x = x0.clone().requires_grad_()
        gates = routing.gates_TK.clone().requires_grad_()
        y, stats = _dispatch(x, Routing(gates, routing.experts_TK, None, None, None), experts,
                             compressor, with_stats=True)
        assert stats.sent_rows == stats.rows == 80
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        results.append((y.detach(), x.grad, gates.grad))
        experts.zero_grad()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_identity_expert_with_compensation_restores_rows_exactly():
    x, experts = _sorted_rows(300, 8, 3)
    comp = _lsh(8, 3, num_hashes=2, rotation_dim=1)
    payload, _, context = comp.compress(_rows(x, experts, 3), StageTimer(False))
    assert payload.shape[0] < 300                       # clusters do merge rows
    assert torch.equal(_restore(payload.clone(), context), x)


@pytest.mark.parametrize("compensation", ["residual", "none"])
def test_fused_combine_equals_restore_then_weighted_sum(compensation):
    x, experts = _sorted_rows(120, 8, 3, seed=4)
    gates = torch.rand(120)
    rows = _rows(x, experts, 3, gates)
    comp = _lsh(8, 3, num_hashes=3, rotation_dim=1, compensation=compensation)
    payload, _, context = comp.compress(rows, StageTimer(False))
    expert_out = torch.tanh(payload * 3.0)
    fused = comp.combine(expert_out, context, rows, StageTimer(False))
    reference = weighted_sum_into_tokens(_restore(expert_out, context, compensation), rows)
    assert torch.allclose(fused, reference, atol=1e-6)


@pytest.mark.parametrize("compensation", ["residual", "linear", "none"])
def test_gradcheck_lsh_dispatch_path(compensation, monkeypatch):
    """float64 gradcheck of compress -> experts -> combine, w.r.t. tokens and gates (linear
    compensation with its fitted maps held fixed, as the backward treats them)."""
    torch.manual_seed(0)
    num_tokens, hidden, num_experts = 12, 6, 3
    gen = torch.Generator().manual_seed(9)
    maps = [torch.randn(hidden, num_experts * 8, generator=gen, dtype=torch.float64)
            for _ in range(2)]
    monkeypatch.setattr(lsh, "linear_surrogates", lambda *args, **kw: maps)
    experts = GroupedExperts(num_experts, hidden, 5, seed=2, params_dtype=torch.float64)
    comp = _lsh(hidden, num_experts, num_hashes=2, rotation_dim=1,
                         compensation=compensation)
    experts_TK = torch.stack([torch.arange(num_tokens) % 3, (torch.arange(num_tokens) + 1) % 3], 1)
    x = torch.randn(num_tokens, hidden, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(num_tokens, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, gates):
        return _dispatch(x, Routing(gates, experts_TK, None, None, None), experts, comp)

    sent = AllToAllDispatcher(num_experts, None, comp)(
        x, Routing(gates, experts_TK, None, None, None), experts)[1].sent_rows
    assert sent < 2 * num_tokens                        # the check covers merged clusters
    assert torch.autograd.gradcheck(fn, (x, gates), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("compensation", ["residual", "none"])
def test_gradcheck_whole_layer_with_lsh(compensation):
    torch.manual_seed(1)
    cfg = MoEConfig(num_experts=4, router_topk=2, z_loss_coeff=1e-2,
                    **compression("lsh", num_hashes=2, rotation_dim=1, compensation=compensation))
    layer = MoELayer(cfg, 6, 8, ProcessGroups.single(), params_dtype=torch.float64, seed=3)
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)

    def fn(x):
        y, losses = layer(x)
        return y, losses["aux_loss"], losses["z_loss"]

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


def test_rotations_live_in_the_state_dict_and_redraw_on_schedule():
    cfg = MoEConfig(num_experts=4, **compression("lsh", redraw_interval=10))
    layer = MoELayer(cfg, 16, 32, ProcessGroups.single(), seed=7)
    first = layer.compressor.rotations.clone()
    assert "compressor.rotations" in layer.state_dict()
    layer.set_iteration(9)
    assert torch.equal(layer.compressor.rotations, first)
    layer.set_iteration(25)                             # epoch 2: redrawn
    redrawn = layer.compressor.rotations.clone()
    assert not torch.equal(redrawn, first)

    other = MoELayer(cfg, 16, 32, ProcessGroups.single(), seed=7)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.compressor.rotations, redrawn)
    other.set_iteration(26)                             # same epoch after resume: no redraw
    assert torch.equal(other.compressor.rotations, redrawn)
    other.set_iteration(30)                             # the draw for an epoch is fixed
    layer.set_iteration(30)
    assert torch.equal(other.compressor.rotations, layer.compressor.rotations)


def _text_rows(hidden=64, num_experts=8):
    x = text_states(FIXTURE.read_text(), hidden)
    gen = torch.Generator().manual_seed(1)
    router = torch.randn(num_experts, hidden, generator=gen)
    experts = torch.topk(x @ router.t(), 2, dim=-1).indices.reshape(-1)
    token = torch.arange(x.shape[0]).repeat_interleave(2)
    order = torch.argsort(experts, stable=True)
    return x[token[order]], experts[order]


def _rate_and_cos(rows, experts, num_hashes, rotation_dim, hash_type, seeds=(0, 1, 2)):
    rates, coss = [], []
    for seed in seeds:
        rot = lsh.draw_rotations(rows.shape[1], num_hashes, rotation_dim, seed)
        codes, radices = lsh.hash_codes(rows, rot, num_hashes, rotation_dim, hash_type)
        clusters = lsh.cluster_rows(experts, codes, radices, 8)
        centroids = lsh.segment_mean(rows, clusters)
        rates.append(clusters.num_clusters / rows.shape[0])
        coss.append(float(lsh.mean_cosine(rows, torch.arange(rows.shape[0]), centroids, clusters,
                                          max_rows=10 ** 9)))
    return sum(rates) / len(rates), sum(coss) / len(coss)


def test_real_text_rate_falls_as_the_number_of_hashes_falls():
    rows, experts = _text_rows()
    points = [_rate_and_cos(rows, experts, L, 1, "cross_polytope") for L in (2, 4, 6, 8, 10)]
    rates, coss = zip(*points)
    assert all(a < b for a, b in zip(rates, rates[1:])), rates
    assert all(a < b for a, b in zip(coss, coss[1:])), coss
    assert rates[2] < 0.25                              # L = 6: under a quarter of the rows


def test_cross_polytope_keeps_more_cosine_than_spherical_plane_at_similar_rate():
    """Same buckets per function (2m = 2^m'); CP's cos read off its curve at SP's rates."""
    rows, experts = _text_rows()
    for cp_m, sp_m in ((8, 4), (16, 5)):
        cp = [_rate_and_cos(rows, experts, L, cp_m, "cross_polytope") for L in (1, 2, 3, 4)]
        sp_rate, sp_cos = _rate_and_cos(rows, experts, 2, sp_m, "spherical_plane")
        lower = max(p for p in cp if p[0] <= sp_rate)
        upper = min(p for p in cp if p[0] >= sp_rate)
        t = 0.0 if upper[0] == lower[0] else (sp_rate - lower[0]) / (upper[0] - lower[0])
        cp_cos = lower[1] + t * (upper[1] - lower[1])
        assert cp_cos > sp_cos, (cp_m, sp_m, cp, sp_rate, sp_cos)


def test_scaled_compensation_is_exact_for_a_linear_expert_and_its_gradient_holds_alpha_fixed(
        monkeypatch):
    """With an expert E(x) = a x the secant slope is a, so E(c) + a (x - c) = E(x) exactly;
    the backward differentiates the forward with alpha as a constant (a stop-gradient)."""
    torch.manual_seed(0)
    num_tokens, hidden, num_experts, a = 12, 6, 3, 0.3
    comp = _lsh(hidden, num_experts, num_hashes=2, rotation_dim=1, compensation="scaled")
    experts_TK = torch.stack([torch.arange(num_tokens) % 3, (torch.arange(num_tokens) + 1) % 3], 1)
    x = torch.randn(num_tokens, hidden, dtype=torch.float64)
    gates = torch.rand(num_tokens, 2, dtype=torch.float64)

    class Linear(torch.nn.Module):
        num_experts = 3

        def forward(self, x_MH, counts):
            return a * x_MH
    out, stats = _dispatch(x, Routing(gates, experts_TK, None, None, None), Linear(), comp,
                           with_stats=True)
    assert stats.sent_rows < 2 * num_tokens
    assert abs(stats.extra["compensation_alpha"] - a) < 1e-9
    assert torch.allclose(out, a * x * gates.sum(1, keepdim=True), atol=1e-12)

    experts = GroupedExperts(num_experts, hidden, 5, seed=2, params_dtype=torch.float64)
    fixed_alpha = torch.tensor([0.4, 0.7, 0.1], dtype=torch.float64)
    monkeypatch.setattr(lsh, "secant_slopes", lambda *args, **kw: fixed_alpha)
    xg = x.clone().requires_grad_()
    gg = gates.clone().requires_grad_()

    def fn(x, gates):
        return _dispatch(x, Routing(gates, experts_TK, None, None, None), experts, comp)
    assert torch.autograd.gradcheck(fn, (xg, gg), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_hashes", [0, 2, 6])
def test_target_rate_sends_exactly_the_budget_per_expert(num_hashes):
    x, experts = _sorted_rows(300, 16, 3, seed=7)
    rows = _rows(x, experts, 3)
    comp = _lsh(16, 3, num_hashes=num_hashes, rotation_dim=1, target_rate=0.1)
    payload, per_expert, context = comp.compress(rows, StageTimer(False))
    want = torch.ceil(torch.bincount(experts, minlength=3) * 0.1).long()
    assert torch.equal(per_expert, want) and payload.shape[0] == int(want.sum())
    # The payload rows are the means of their clusters' rows.
    means = torch.zeros(payload.shape).index_add(0, context.clusters.cluster_of_row, x)
    means /= context.clusters.rows_per_cluster.unsqueeze(1)
    assert torch.allclose(payload, means, atol=1e-6)


@pytest.mark.parametrize("num_hashes", [0, 3])
def test_target_rate_sketch_comes_from_the_router_without_row_copies(num_hashes):
    """H > the sketch width: the sketch columns ride in the router's matmul, the rows are
    never gathered, and the clusters are those of the tokens' sketch gathered to rows."""
    from megatron_lsh.moe.compressors import clustering
    hidden = 2 * clustering.SKETCH_DIM
    comp = _lsh(hidden, 4, num_hashes=num_hashes, rotation_dim=1, target_rate=0.1)
    columns = comp.router_columns()
    assert columns.shape == (hidden, num_hashes + clustering.SKETCH_DIM)
    assert "sketch" not in comp.state_dict()           # derived, not checkpointed
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(200, hidden, generator=gen)
    top = torch.topk(torch.randn(200, 4, generator=gen), 2, dim=1).indices.reshape(-1)
    order = torch.argsort(top, stable=True)
    token = torch.arange(200).repeat_interleave(2)[order]
    rows = Rows(x, top[order], token, torch.full((400,), 0.5), torch.bincount(top, minlength=4),
                torch.arange(400)[order], 2, router_columns_TQ=x @ columns)
    payload, per_expert, context = comp.compress(rows, StageTimer(False))
    assert rows._rows_RH is None                        # no [rows, H] copy was made
    want = torch.ceil(torch.bincount(top, minlength=4) * 0.1).long()
    assert torch.equal(per_expert, want)
    if num_hashes == 0:                                 # the tokens' sketch, gathered
        search = (x @ clustering.sketch_basis(hidden, clustering.SKETCH_DIM))[token]
        ref, _, _ = clustering.cluster_to_budget(None, rows.expert_of_row_R, want,
                                                 search_RD=search)
        assert torch.equal(context.clusters.cluster_of_row, ref)
    means = torch.zeros(payload.shape).index_add(0, context.clusters.cluster_of_row, x[token])
    means /= context.clusters.rows_per_cluster.unsqueeze(1)
    assert torch.allclose(payload, means, atol=1e-5)


def test_target_rate_has_less_residual_than_hashing_at_the_same_rate():
    """On real hidden states, refined clusters at LSH's own rate leave less residual energy."""
    x = text_states(FIXTURE.read_text(), 64, num_tokens=1024)
    experts = torch.zeros(1024, dtype=torch.long)
    rows = _rows(x, experts, 1)
    hashed = _lsh(64, 1, num_hashes=8, rotation_dim=1)
    _, per_expert, ctx_hash = hashed.compress(rows, StageTimer(False))
    rate = float(per_expert.sum()) / 1024
    refined = _lsh(64, 1, num_hashes=0, target_rate=rate)
    _, per_expert2, ctx_split = refined.compress(rows, StageTimer(False))
    assert int(per_expert2.sum()) <= int(per_expert.sum())
    energy = [float(comp.statistics(ctx)["residual_energy"])
              for comp, ctx in ((hashed, ctx_hash), (refined, ctx_split))]
    assert energy[1] < 0.8 * energy[0], energy


def test_residual_variance_is_not_flattered_by_a_direction_all_rows_share():
    """Rows = a large common vector + small token-specific parts: one cluster per expert keeps
    almost all the energy (cos ~ 1) but loses all the spread (variance 1); singletons lose
    nothing; the variance matches its definition with the experts' own means."""
    gen = torch.Generator().manual_seed(2)
    x = 50.0 + torch.randn(90, 8, generator=gen)
    experts = torch.sort(torch.randint(0, 3, (90,), generator=gen)).values
    one_each = lsh.Clusters(experts.clone(), torch.bincount(experts, minlength=3),
                            torch.ones(3, dtype=torch.long))
    cos, energy, variance = lsh.distortion(x, torch.arange(90), lsh.segment_mean(x, one_each),
                                           one_each)
    assert float(cos) > 0.999 and float(energy) < 1e-3
    assert abs(float(variance) - 1.0) < 1e-5
    singletons = lsh.Clusters(torch.arange(90), torch.ones(90, dtype=torch.long),
                              torch.bincount(experts, minlength=3))
    assert float(lsh.distortion(x, torch.arange(90), x, singletons)[2]) == 0.0
    halves = lsh.Clusters(experts * 2 + (torch.arange(90) % 2), None, None)
    halves = lsh.Clusters(halves.cluster_of_row, torch.bincount(halves.cluster_of_row),
                          torch.full((3,), 2))
    c = lsh.segment_mean(x, halves)
    means = torch.stack([x[experts == e].mean(0) for e in range(3)])
    expected = (x - c[halves.cluster_of_row]).square().sum() / (x - means[experts]).square().sum()
    assert torch.allclose(lsh.distortion(x, torch.arange(90), c, halves)[2], expected, rtol=1e-5)


def test_wire_dtype_stacks_fp8_under_lsh():
    x = torch.randn(64, 16)
    sizes = []
    for dtype in (None, "fp8"):
        cfg = MoEConfig(num_experts=4, router_topk=2,
                        **compression("lsh", num_hashes=2, wire_dtype=dtype))
        layer = MoELayer(cfg, 16, 32, ProcessGroups.single(), seed=3)
        layer(x)
        sizes.append((layer.last_stats.sent_rows, layer.last_stats.bytes_fwd_total))
    assert sizes[0][0] == sizes[1][0]                     # same clusters
    assert sizes[1][1] * 64 == sizes[0][1] * (16 + 4)     # 4 bytes/value -> 1 + a 4-byte scale


@pytest.mark.parametrize("options", [dict(num_hashes=2), dict(num_hashes=0, target_rate=0.1),
                                     dict(num_hashes=3, target_rate=0.1)])
def test_inter_node_scope_sends_rows_for_experts_on_the_node_as_they_are(options):
    x, experts = _sorted_rows(300, 16, 3, seed=2)
    rows = _rows(x, experts, 3)
    comp = LSHCompressor(LSHOptions(scope="inter-node", **options), hidden_size=16,
                         num_experts=3, same_node_E=torch.tensor([True, False, True]))
    payload, per_expert, context = comp.compress(rows, StageTimer(False))
    rows_E = torch.bincount(experts, minlength=3)
    assert per_expert[0] == rows_E[0] and per_expert[2] == rows_E[2]
    assert per_expert[1] < rows_E[1]
    kept = (experts != 1).nonzero().squeeze(1)
    clusters_of_kept = context.clusters.cluster_of_row[kept]
    assert torch.equal(payload[clusters_of_kept], x[kept])       # sent as they are


def _linear_expert(matrix):
    class Linear(torch.nn.Module):
        num_experts = 3

        def forward(self, x_MH, counts):
            return x_MH @ matrix.t()
    return Linear()


def test_linear_compensation_is_exact_for_a_linear_expert(monkeypatch):
    """E(x) = A x, rank H and no ridge: the fitted model is A, so every row comes back as A x
    although rows were merged (residual or scaled compensation cannot do that for a general A)."""
    torch.manual_seed(0)
    num_tokens, hidden = 60, 4
    matrix = torch.randn(hidden, hidden, dtype=torch.float64)
    monkeypatch.setattr(lsh, "LINEAR_RIDGE", 0.0)
    comp = _lsh(hidden, 3, num_hashes=3, rotation_dim=1, compensation="linear",
                linear_rank=hidden)
    experts_TK = torch.stack([torch.arange(num_tokens) % 3, (torch.arange(num_tokens) + 1) % 3], 1)
    x = torch.randn(num_tokens, hidden, dtype=torch.float64)
    gates = torch.rand(num_tokens, 2, dtype=torch.float64)
    out, stats = _dispatch(x, Routing(gates, experts_TK, None, None, None),
                           _linear_expert(matrix), comp, with_stats=True)
    assert stats.sent_rows < 2 * num_tokens
    assert torch.allclose(out, (x @ matrix.t()) * gates.sum(1, keepdim=True), atol=1e-10)


def test_linear_surrogates_recover_a_linear_map_on_the_span_of_the_centroids():
    """Centroids in an affine r-dim subspace: B P^T equals A on that subspace (rank r, no ridge),
    and an expert with a single cluster gets a zero block."""
    gen = torch.Generator().manual_seed(3)
    hidden, rank = 8, 3
    basis = torch.randn(hidden, rank, generator=gen, dtype=torch.float64)
    c = torch.randn(10, rank, generator=gen, dtype=torch.float64) @ basis.t() + 1.5
    matrix = torch.randn(hidden, hidden, generator=gen, dtype=torch.float64)
    c = torch.cat([c, torch.randn(1, hidden, generator=gen, dtype=torch.float64)])
    expert_C = torch.tensor([0] * 10 + [1])
    p, b = lsh.linear_surrogates(c, c @ matrix.t() + 0.3, expert_C, 2, rank, ridge=0.0)
    d = torch.randn(5, rank, generator=gen, dtype=torch.float64) @ basis.t()
    assert torch.allclose(d @ p[:, :rank] @ b[:, :rank].t(), d @ matrix.t(), atol=1e-10)
    assert torch.count_nonzero(p[:, rank:]) == 0 and torch.count_nonzero(b[:, rank:]) == 0


def test_linear_correction_matches_the_row_by_row_formula_and_skips_singletons_and_unused_slots():
    gen = torch.Generator().manual_seed(5)
    num_tokens, hidden, rank, num_experts = 7, 5, 2, 3
    x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    centroids = torch.randn(4, hidden, generator=gen, dtype=torch.float64)
    clusters = lsh.Clusters(torch.zeros(0, dtype=torch.long), torch.tensor([2, 3, 1, 2]),
                            torch.tensor([1, 2, 1]))     # cluster 2 is a singleton
    expert_C = lsh.expert_of_cluster(clusters)
    cluster_TK = torch.tensor([[0, 1], [2, 3], [1, 4], [3, 0], [4, 2], [0, 3], [2, 1]])
    gate_TK = torch.rand(num_tokens, 2, generator=gen, dtype=torch.float64)
    p = torch.randn(hidden, num_experts * rank, generator=gen, dtype=torch.float64)
    b = torch.randn(hidden, num_experts * rank, generator=gen, dtype=torch.float64)
    out = lsh.linear_correction(x, centroids, cluster_TK, gate_TK, clusters, expert_C, p, b,
                                rank)
    expected = torch.zeros_like(x)
    for t in range(num_tokens):
        for j in range(2):
            c = int(cluster_TK[t, j])
            if c in (2, 4):             # a singleton (x = c), or the dummy: sent nothing
                continue
            e = int(expert_C[c])
            block = slice(e * rank, (e + 1) * rank)
            expected[t] += gate_TK[t, j] * ((x[t] - centroids[c]) @ p[:, block]) @ b[:, block].t()
    assert torch.allclose(out, expected, atol=1e-12)
