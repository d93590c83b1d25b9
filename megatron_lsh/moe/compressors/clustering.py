"""Exactly-counted clusters of the rows bound for each expert (error-driven splitting + Lloyd).

Why: LSH buckets make the all-to-all payload depend on the data (how many distinct codes the
rows happen to hit). A compressor that makes the byte count a setting, a *target rate* R, needs
exactly ``ceil(R * rows_e)`` clusters for expert e, and among partitions of that size one with
little distortion. This module builds such partitions with tensor code (CPU or CUDA, no
autograd; the split rounds in C++ on CPU, below): Python loops run over rounds and iterations
only, never over rows, clusters or experts. Deterministic: no RNG but fixed seeds; on CUDA,
bitwise repeatability also needs ``torch.use_deterministic_algorithms(True)`` (``index_add_``
then avoids float atomics).

Algorithm (:func:`cluster_to_budget`):

1. Sketch (:func:`sketch_rows`): when H > ``sketch_dim`` (default 128), the search runs on the
   rows projected on ``sketch_dim`` fixed random orthonormal directions, which roughly keeps
   distances, SSEs and principal axes at a fraction of the memory traffic.
2. Start from one cluster per expert that has rows, or from an initial partition (e.g. LSH
   buckets, each within one expert). An expert whose initial partition has more clusters than
   its target ``min(budget_e, rows_e)`` restarts from a single cluster (no merging).
3. Each round, per cluster: centroid and sum of squared error (SSE) to it (kept up to date for
   the clusters a round touches only). Each expert picks, largest SSE first, up to
   ``min(target_e - clusters_e, ceil(split_fraction * clusters_e))`` of its clusters with two
   rows or more and an SSE of at least ``sse_ratio`` times its largest. Cutting every cluster
   each round (doubling) wastes the budget on tight clusters: on real hidden states at rate 0.2
   the defaults (0.5, 0.25) raise the mean cosine from 0.77 to 0.86, and the ratio alone makes
   Gaussian blobs come out exactly. A zero-SSE cluster (identical rows) comes after every
   positive-SSE one, so it is cut only when the count cannot be met otherwise.
4. Every picked cluster is cut in two along its principal axis, all at once: ``power_iters``
   power iterations ``v <- S v`` on its scatter matrix ``S = sum (x - c)(x - c)^T`` (segment sums
   with ``index_add``), started from the row farthest from the centroid; rows with
   ``(x - c) . v > 0`` form the new cluster. ``refine_iters`` 2-means steps between the two
   halves then move the cut (each never increases the SSE). A cut that leaves a side empty
   (identical rows) cuts by row order instead: the first half stays, so the count always grows.
5. Steps 3-4 repeat until every expert has its target, about ``log(budget) / log(1 +
   split_fraction)`` rounds on real data. Bounds for adversarial data: after
   ``4 * bit_length(R) + 8`` rounds the SSE ratio rule is dropped (the count then grows by
   ``1 + split_fraction`` per round); after ``2 * bit_length(R) / log2(1 + split_fraction) + 4``
   more, every expert cuts all it needs by row order, which halves the largest cluster.
6. ``lloyd_iters`` Lloyd passes (:func:`lloyd_refine`), in H dims: each row moves to the
   nearest centroid of its own expert (found in the sketch) if that is strictly nearer in
   exact distance, except one *anchor* per cluster (its row nearest to its centroid), so no
   cluster empties and the counts stay exact; then centroids are recomputed. Neither half of
   a pass increases the SSE.
7. Canonical numbering (:func:`canonical_numbering`): clusters numbered by their first row, so
   with rows sorted by expert the clusters come out sorted by expert, and when every row is its
   own cluster, cluster i is row i.

Steps 3-5 run in C++ on CPU (``_split``, from ``split_rounds.cpp``, built by ``pip install``;
about 4x faster: five fused passes over the cut rows per round instead of ~fifteen tensor ops
with ``[rows, dim]`` temporaries) and in tensor code elsewhere; the two agree row for row
except where a different summation order puts a row on the other side of a cut.

:func:`cluster_budget` turns a rate into budgets, :func:`cluster_centroids` gives the segment
means and :func:`distortion` the quality (mean cosine, relative residual energy).

Legend: R rows, H hidden, D sketch width, C clusters, E experts, U clusters cut in a round,
n rows of those clusters, N rows / J clusters of the largest expert.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch

try:  # the C++ split rounds (setup.py); without them the tensor version runs
    from megatron_lsh.moe.compressors import _split as _compiled
except ImportError:  # pragma: no cover - depends on the build
    _compiled = None
    warnings.warn("megatron_lsh.moe.compressors._split is not built; the target-rate LSH "
                  "clustering uses its ~4x slower tensor version on CPU (build it with: pip "
                  "install -e . or python setup.py build_ext --inplace)", stacklevel=2)

SKETCH_DIM = 128
"""Default width of the random projection the splits search in (when H is larger)."""


def cluster_budget(rows_per_expert_E: torch.Tensor, rate: float) -> torch.Tensor:
    """``[E]`` int64 clusters per expert for a target rate: ``ceil(rate * rows_e)``.

    Clamped to ``[1, rows_e]`` for experts with rows (0 for experts without).
    """
    rows_E = rows_per_expert_E.to(torch.int64)
    want_E = torch.ceil(rows_E.double() * float(rate)).to(torch.int64)
    return torch.minimum(want_E.clamp_min(1), rows_E)


def _segment_arg(values_n: torch.Tensor, seg_n: torch.Tensor, num: int, largest: bool
                 ) -> torch.Tensor:
    """``[num]`` index of the largest (smallest) value of each segment; lowest index on ties."""
    n = values_n.shape[0]
    fill = float("-inf") if largest else float("inf")
    best = torch.full((num,), fill, dtype=values_n.dtype, device=values_n.device)
    best.scatter_reduce_(0, seg_n, values_n, reduce="amax" if largest else "amin")
    hit = values_n == best[seg_n]
    index_n = torch.arange(n, device=values_n.device)
    arg = torch.full((num,), n, dtype=torch.int64, device=values_n.device)
    return arg.scatter_reduce_(0, seg_n[hit], index_n[hit], reduce="amin")


def _rank_in_segment(seg_n: torch.Tensor, num: int) -> torch.Tensor:
    """``[n]`` position of each element among those of its segment, in index order."""
    order_n = torch.argsort(seg_n, stable=True)
    count_U = torch.bincount(seg_n, minlength=num)
    start_U = torch.cumsum(count_U, 0) - count_U
    rank_n = torch.empty_like(seg_n)
    rank_n[order_n] = torch.arange(seg_n.shape[0], device=seg_n.device) - start_U[seg_n[order_n]]
    return rank_n


def _first_rows(cluster_of_row_R: torch.Tensor, num: int) -> torch.Tensor:
    """``[C]`` first row of each cluster (R for an empty id)."""
    rows = cluster_of_row_R.shape[0]
    first_C = torch.full((num,), rows, dtype=torch.int64, device=cluster_of_row_R.device)
    row_R = torch.arange(rows, device=cluster_of_row_R.device)
    return first_C.scatter_reduce_(0, cluster_of_row_R, row_R, reduce="amin")


def canonical_numbering(cluster_of_row_R: torch.Tensor, expert_of_row_R: torch.Tensor,
                        num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Renumber any partition (non-negative ids, gaps allowed) by first row.

    Returns ``(cluster_of_row_R, rows_per_cluster_C, centroids_per_expert_E)``; with rows sorted
    by expert, clusters come out sorted by expert, and a partition into singletons is the
    identity.
    """
    device = expert_of_row_R.device
    if cluster_of_row_R.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty.clone(), torch.zeros(num_experts, dtype=torch.int64, device=device)
    _, dense_R = torch.unique(cluster_of_row_R, return_inverse=True)
    num = int(dense_R.max()) + 1
    first_C = _first_rows(dense_R, num)
    order_C = torch.argsort(first_C)
    new_id_C = torch.empty_like(order_C)
    new_id_C[order_C] = torch.arange(num, device=device)
    cluster_R = new_id_C[dense_R]
    rows_per_cluster_C = torch.bincount(cluster_R, minlength=num)
    expert_of_cluster_C = expert_of_row_R[first_C[order_C]]
    return cluster_R, rows_per_cluster_C, torch.bincount(expert_of_cluster_C,
                                                         minlength=num_experts)


def cluster_centroids(x_RH: torch.Tensor, cluster_of_row_R: torch.Tensor,
                      num_clusters: int) -> torch.Tensor:
    """``[C, H]`` fp32 centroids: the mean of each cluster's rows (0 for an empty id)."""
    x_RH = x_RH.detach().float()
    sums_CH = x_RH.new_zeros((num_clusters, x_RH.shape[1])).index_add_(0, cluster_of_row_R, x_RH)
    count_C = torch.bincount(cluster_of_row_R, minlength=num_clusters).clamp_min(1)
    return sums_CH / count_C.to(sums_CH.dtype).unsqueeze(1)


def distortion(x_RH: torch.Tensor, cluster_of_row_R: torch.Tensor,
               centroids_CH: torch.Tensor) -> dict:
    """Quality of replacing each row by its centroid, as Python floats.

    ``mean_cos``: mean over rows of cos(x, c); ``rel_residual``: ``sum |x - c|^2 / sum |x|^2``;
    ``sse``: ``sum |x - c|^2``. All computed in fp32 (0 rows: cos 1, residual 0).
    """
    x_RH = x_RH.detach().float()
    if x_RH.shape[0] == 0:
        return {"mean_cos": 1.0, "rel_residual": 0.0, "sse": 0.0}
    c_RH = centroids_CH.detach().float().index_select(0, cluster_of_row_R)
    cos_R = torch.nn.functional.cosine_similarity(x_RH, c_RH, dim=1, eps=1e-12)
    sse = (x_RH - c_RH).square().sum()
    energy = x_RH.square().sum().clamp_min(1e-30)
    return {"mean_cos": float(cos_R.mean()), "rel_residual": float(sse / energy),
            "sse": float(sse)}


def _initial_partition(expert_R: torch.Tensor, target_E: torch.Tensor,
                       init_R: torch.Tensor | None) -> torch.Tensor:
    """Dense ids ``[R]`` of the starting partition (step 2)."""
    if init_R is None:
        return torch.unique_consecutive(expert_R, return_inverse=True)[1]
    init_R = init_R.to(device=expert_R.device, dtype=torch.int64)
    if init_R.shape != expert_R.shape:
        raise ValueError(f"init_cluster_of_row_R has shape {tuple(init_R.shape)}, "
                         f"expected {tuple(expert_R.shape)}")
    cluster_R = torch.unique(init_R, return_inverse=True)[1]
    num = int(cluster_R.max()) + 1
    expert_C = expert_R[_first_rows(cluster_R, num)]
    if bool((expert_C[cluster_R] != expert_R).any()):
        raise ValueError("an initial cluster spans more than one expert")
    over_E = torch.bincount(expert_C, minlength=target_E.numel()) > target_E
    cluster_R = torch.where(over_E[expert_R], num + expert_R, cluster_R)
    return torch.unique(cluster_R, return_inverse=True)[1]


def _pick(sse_C, count_C, expert_C, allowed_E, clusters_E, ratio) -> torch.Tensor:
    """``[C]`` bool: per expert, up to ``allowed_e`` splittable clusters, largest SSE first,
    none with an SSE below ``ratio`` times the largest of its expert."""
    key_C = torch.where(count_C >= 2, sse_C, torch.full_like(sse_C, -1.0))
    if ratio > 0:
        top_E = key_C.new_full(clusters_E.shape, -1.0).scatter_reduce_(0, expert_C, key_C, "amax")
        key_C = torch.where(key_C >= ratio * top_E[expert_C], key_C, torch.full_like(key_C, -1.0))
    order_C = torch.argsort(key_C, descending=True, stable=True)
    order_C = order_C[torch.argsort(expert_C[order_C], stable=True)]
    start_E = torch.cumsum(clusters_E, 0) - clusters_E
    expert_sorted_C = expert_C[order_C]
    rank_C = torch.arange(order_C.numel(), device=order_C.device) - start_E[expert_sorted_C]
    chosen_C = (rank_C < allowed_E[expert_sorted_C]) & (key_C[order_C] >= 0)
    selected_C = torch.zeros_like(chosen_C)
    selected_C[order_C] = chosen_C
    return selected_C


def _cut(r_nD, d_n, seg_n, num, count_U, power_iters, refine_iters, by_order) -> torch.Tensor:
    """``[n]`` bool: the side of each row when every segment is cut in two (step 4)."""
    side_n = torch.zeros_like(seg_n, dtype=torch.bool)
    if not by_order:
        # (index_select / index_add rather than advanced indexing: much faster on CPU.)
        v_SD = r_nD.index_select(0, _segment_arg(d_n, seg_n, num, largest=True))
        for _ in range(power_iters):
            proj_n = (r_nD * v_SD.index_select(0, seg_n)).sum(1)
            v_SD = torch.zeros_like(v_SD).index_add_(0, seg_n, r_nD * proj_n.unsqueeze(1))
            v_SD = v_SD / v_SD.norm(dim=1, keepdim=True).clamp_min(1e-30)
        side_n = (r_nD * v_SD.index_select(0, seg_n)).sum(1) > 0
        total_SD = torch.zeros_like(v_SD).index_add_(0, seg_n, r_nD)
        for _ in range(refine_iters):
            # One 2-means step: the new half is the rows nearer its mean than the other's.
            side_f_n = side_n.to(r_nD.dtype)
            n1_U = r_nD.new_zeros(num).index_add_(0, seg_n, side_f_n)
            s1_SD = torch.zeros_like(v_SD).index_add_(0, seg_n, r_nD * side_f_n.unsqueeze(1))
            m1_SD = s1_SD / n1_U.clamp_min(1).unsqueeze(1)
            m0_SD = (total_SD - s1_SD) / (count_U - n1_U).clamp_min(1).unsqueeze(1)
            w_SD = m1_SD - m0_SD
            bias_U = 0.5 * (m1_SD.square().sum(1) - m0_SD.square().sum(1))
            ok_U = (n1_U > 0) & (n1_U < count_U)
            moved_n = (r_nD * w_SD.index_select(0, seg_n)).sum(1) > bias_U[seg_n]
            side_n = torch.where(ok_U[seg_n], moved_n, side_n)
    n1_U = torch.bincount(seg_n[side_n], minlength=num)
    bad_U = (n1_U == 0) | (n1_U == count_U.to(torch.int64))
    if bool(bad_U.any()):
        rank_n = _rank_in_segment(seg_n, num)
        half_n = rank_n >= torch.div(count_U.to(torch.int64), 2, rounding_mode="floor")[seg_n]
        side_n = torch.where(bad_U[seg_n], half_n, side_n)
    return side_n


def _split_rounds(x_RD, expert_R, cluster_R, target_E, power_iters, refine_iters, fraction,
                  ratio):
    """Steps 3-5: cut clusters until every expert has its target count; returns ``[R]`` ids.

    On CPU with the compiled extension (``_split``, built by ``pip install``) the rounds run
    in C++, five fused passes per round instead of the tensor version's ~fifteen; elsewhere
    (CUDA, or the extension not built) :func:`_split_rounds_torch` runs them.
    """
    if x_RD.device.type == "cpu" and _compiled is not None:
        ids = _compiled.split_rounds(x_RD.contiguous().numpy(), expert_R.contiguous().numpy(),
                                     cluster_R.contiguous().numpy(),
                                     target_E.contiguous().numpy(), int(power_iters),
                                     int(refine_iters), float(fraction), float(ratio))
        return torch.from_numpy(ids)
    return _split_rounds_torch(x_RD, expert_R, cluster_R, target_E, power_iters, refine_iters,
                               fraction, ratio)


def _split_rounds_torch(x_RD, expert_R, cluster_R, target_E, power_iters, refine_iters,
                        fraction, ratio):
    """:func:`_split_rounds` in tensor code (any device); the reference of the C++ version."""
    rows, dim = x_RD.shape
    num_experts = target_E.numel()
    num = int(cluster_R.max()) + 1
    count_C = torch.bincount(cluster_R, minlength=num)
    sums_CD = x_RD.new_zeros((num, dim)).index_add_(0, cluster_R, x_RD)
    r_RD = x_RD - (sums_CD / count_C.to(x_RD.dtype).unsqueeze(1)).index_select(0, cluster_R)
    d_R = r_RD.square().sum(1)
    sse_C = x_RD.new_zeros(num).index_add_(0, cluster_R, d_R)
    expert_C = expert_R[_first_rows(cluster_R, num)]
    clusters_E = torch.bincount(expert_C, minlength=num_experts)
    # Without the ratio rule each round multiplies the count by (1 + fraction) while enough
    # clusters can be cut; by row order, it halves the largest cluster.
    ratio_rounds = 4 * rows.bit_length() + 8
    axis_rounds = ratio_rounds + 2 * math.ceil(rows.bit_length() / math.log2(1 + fraction)) + 4
    for round_ in range(axis_rounds + rows.bit_length() + 2):
        remaining_E = target_E - clusters_E
        if not bool((remaining_E > 0).any()):
            return cluster_R
        by_order = round_ >= axis_rounds
        allowed_E = remaining_E if by_order else torch.minimum(
            remaining_E, torch.ceil(clusters_E.double() * fraction).to(torch.int64))
        selected_C = _pick(sse_C, count_C, expert_C, allowed_E, clusters_E,
                           ratio if round_ < ratio_rounds else 0.0)
        parent_U = torch.nonzero(selected_C).squeeze(1)
        num_cut = parent_U.numel()
        sel_id_C = torch.cumsum(selected_C, 0) - 1
        idx_n = torch.nonzero(selected_C[cluster_R]).squeeze(1)
        seg_n = sel_id_C[cluster_R[idx_n]]
        count_U = count_C[parent_U].to(x_RD.dtype)
        side_n = _cut(r_RD.index_select(0, idx_n), d_R[idx_n], seg_n, num_cut, count_U,
                      power_iters, refine_iters, by_order)
        # The parent keeps id parent_U[s]; the new half gets id num + s.
        cluster_R.index_copy_(0, idx_n, torch.where(side_n, num + seg_n, cluster_R[idx_n]))
        local_n = seg_n + num_cut * side_n.to(torch.int64)
        x_nD = x_RD.index_select(0, idx_n)
        cnt_2S = torch.bincount(local_n, minlength=2 * num_cut)
        mean_2SD = x_nD.new_zeros((2 * num_cut, dim)).index_add_(0, local_n, x_nD)
        mean_2SD = mean_2SD / cnt_2S.to(x_RD.dtype).unsqueeze(1)
        r_nD = x_nD - mean_2SD.index_select(0, local_n)
        r_RD.index_copy_(0, idx_n, r_nD)
        d_n = r_nD.square().sum(1)
        d_R.index_copy_(0, idx_n, d_n)
        sse_2S = x_nD.new_zeros(2 * num_cut).index_add_(0, local_n, d_n)
        sse_C[parent_U] = sse_2S[:num_cut]
        sse_C = torch.cat([sse_C, sse_2S[num_cut:]])
        count_C[parent_U] = cnt_2S[:num_cut]
        count_C = torch.cat([count_C, cnt_2S[num_cut:]])
        expert_C = torch.cat([expert_C, expert_C[parent_U]])
        clusters_E = clusters_E + torch.bincount(expert_C[parent_U], minlength=num_experts)
        num += num_cut
    raise RuntimeError("cluster splitting did not reach the budget")  # unreachable


@lru_cache(maxsize=8)
def sketch_basis(hidden: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``[H, dim]`` orthonormal columns from a seeded CPU Gaussian draw (QR, signs fixed).

    The basis :func:`sketch_rows` projects on; a caller that can fold the projection into a
    matmul it does anyway (the router's) multiplies by it there and passes the product as
    ``search_RD`` to :func:`cluster_to_budget`. Cached: do not modify the returned tensor.
    """
    gen = torch.Generator().manual_seed(seed)
    q_HD, r_DD = torch.linalg.qr(torch.randn(hidden, dim, generator=gen))
    return q_HD * torch.sign(torch.diagonal(r_DD)).unsqueeze(0)


def sketch_rows(x_RH: torch.Tensor, dim: int | None, seed: int = 0) -> torch.Tensor:
    """fp32 rows projected on ``dim`` fixed random orthonormal directions (``[R, dim]``).

    Distances, SSEs and principal axes are approximately preserved (Johnson-Lindenstrauss),
    so the clustering can search in ``dim`` instead of H dimensions. Returns the fp32 rows
    themselves when ``dim`` is None or >= H.
    """
    x_RH = x_RH.detach().float()
    if dim is None or dim >= x_RH.shape[1]:
        return x_RH
    return x_RH @ sketch_basis(x_RH.shape[1], int(dim), int(seed)).to(x_RH.device)


def _lloyd(x_RH, search_RD, expert_R, cluster_R, num_experts, iters):
    """Lloyd passes on canonical clusters; candidates from ``search_RD``, moves checked on x."""
    cluster_R, count_C, clusters_E = canonical_numbering(cluster_R, expert_R, num_experts)
    rows, device = cluster_R.shape[0], search_RD.device
    if rows == 0 or iters <= 0:
        return cluster_R, count_C, clusters_E
    rows_E = torch.bincount(expert_R, minlength=num_experts)
    row_start_E = torch.cumsum(rows_E, 0) - rows_E
    cl_start_E = torch.cumsum(clusters_E, 0) - clusters_E
    num = count_C.numel()
    expert_C = expert_R[_first_rows(cluster_R, num)]
    pos_R = torch.arange(rows, device=device) - row_start_E[expert_R]
    local_C = torch.arange(num, device=device) - cl_start_E[expert_C]
    max_rows, max_cl, dim = int(rows_E.max()), int(clusters_E.max()), search_RD.shape[1]
    flat_R = expert_R * max_rows + pos_R
    s_END = search_RD.new_zeros((num_experts * max_rows, dim)).index_copy_(0, flat_R, search_RD)
    s_END = s_END.view(num_experts, max_rows, dim)
    pad_EJ = torch.arange(max_cl, device=device) >= clusters_E.unsqueeze(1)
    s_sq_R = search_RD.square().sum(1)
    for _ in range(iters):
        mean_CH = cluster_centroids(x_RH, cluster_R, num)
        mean_EKD = search_RD.new_zeros((num_experts, max_cl, dim))
        mean_EKD[expert_C, local_C] = (mean_CH if search_RD is x_RH
                                       else cluster_centroids(search_RD, cluster_R, num))
        # |s - c|^2 up to the row's own |s|^2, which does not change the argmin.
        dist_ENJ = mean_EKD.square().sum(2).unsqueeze(1) - 2 * torch.bmm(
            s_END, mean_EKD.transpose(1, 2))
        dist_ENJ.masked_fill_(pad_EJ.unsqueeze(1), float("inf"))
        dist_RJ = dist_ENJ.view(num_experts * max_rows, max_cl).index_select(0, flat_R)
        best_R = cl_start_E[expert_R] + dist_RJ.argmin(1)
        own_R = (cluster_R - cl_start_E[expert_R]).unsqueeze(1)
        # Anchors: each cluster's row nearest its centroid (in the search space) stays.
        near_R = dist_RJ.gather(1, own_R).squeeze(1) + s_sq_R
        candidate_R = best_R != cluster_R
        candidate_R[_segment_arg(near_R, cluster_R, num, largest=False)] = False
        idx_m = torch.nonzero(candidate_R).squeeze(1)
        # Exact fp32 distances, for the candidates only: a row moves only if strictly nearer.
        x_mH = x_RH.index_select(0, idx_m)
        d_cur_m = (x_mH - mean_CH.index_select(0, cluster_R[idx_m])).square().sum(1)
        d_new_m = (x_mH - mean_CH.index_select(0, best_R[idx_m])).square().sum(1)
        idx_m = idx_m[d_new_m < d_cur_m]
        if idx_m.numel() == 0:
            break
        cluster_R = cluster_R.index_copy(0, idx_m, best_R[idx_m])
    return canonical_numbering(cluster_R, expert_R, num_experts)


def lloyd_refine(x_RH: torch.Tensor, expert_of_row_R: torch.Tensor,
                 cluster_of_row_R: torch.Tensor, num_experts: int, iters: int = 1, *,
                 sketch_dim: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iters`` Lloyd passes within each expert that keep every cluster count (step 6).

    Each pass finds each row's nearest centroid of its own expert (in the ``sketch_dim``
    sketch when given, else exactly) and moves the row there when that is strictly nearer
    than its own centroid in exact fp32 distance, except each cluster's anchor (its row nearest
    to its centroid in the search space, lowest row on ties), so no cluster empties and the
    SSE never grows.
    Padded per-expert matmuls: memory ``E * N * (D + K)``. Rows must be sorted by expert.
    Returns the canonical ``(cluster_of_row_R, rows_per_cluster_C, centroids_per_expert_E)``.
    """
    with torch.no_grad():
        x32_RH = x_RH.detach().float()
        expert_R = expert_of_row_R.to(device=x32_RH.device, dtype=torch.int64)
        return _lloyd(x32_RH, sketch_rows(x32_RH, sketch_dim), expert_R,
                      cluster_of_row_R.to(x32_RH.device), num_experts, iters)


def cluster_to_budget(x_RH: torch.Tensor | None, expert_of_row_R: torch.Tensor,
                      budget_E: torch.Tensor, *, init_cluster_of_row_R: torch.Tensor = None,
                      lloyd_iters: int = 0, sketch_dim: int | None = SKETCH_DIM,
                      search_RD: torch.Tensor | None = None,
                      split_fraction: float = 0.5, sse_ratio: float = 0.25,
                      power_iters: int = 1, refine_iters: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partition the rows of each expert into exactly ``min(budget_e, rows_e)`` clusters.

    ``x_RH``: rows (any float dtype; computed in fp32, no autograd), sorted by expert:
    ``expert_of_row_R`` int64 non-decreasing, in ``[0, E)``, ``E = budget_E.numel()``.
    ``budget_E`` must be >= 1 for every expert with rows. ``init_cluster_of_row_R``: optional
    starting partition (any non-negative ids, each cluster within one expert); an expert
    where it has more clusters than the target starts from one cluster instead.
    ``sketch_dim``: split (and search Lloyd candidates) in a fixed random ``sketch_dim``-dim
    projection of the rows (None: in H dims); Lloyd's moves are always checked exactly.
    ``search_RD``: that projection already computed by the caller (e.g. ``sketch_rows`` of
    the tokens, gathered to rows: projecting T tokens instead of R = T * top-k rows, with no
    row copies); ``sketch_dim`` is then ignored, and ``x_RH`` may be None when
    ``lloyd_iters`` is 0 (only Lloyd's exact checks read it).
    ``split_fraction`` / ``sse_ratio``: each round an expert cuts at most this fraction of
    its clusters, largest SSE first, and none with an SSE below this ratio of its largest
    (1 / 0 double the count every round, the fewest rounds). ``power_iters``: power iterations
    for each cut's axis; ``refine_iters``: 2-means steps after each cut. Steps in the module
    docstring. Returns the canonical ``(cluster_of_row_R [R], rows_per_cluster_C [C],
    centroids_per_expert_E [E])``, int64, on the device of ``x_RH``.
    """
    num_experts = budget_E.numel()
    if x_RH is None and (search_RD is None or lloyd_iters > 0):
        raise ValueError("x_RH may be None only with search_RD given and lloyd_iters == 0")
    space = x_RH if x_RH is not None else search_RD
    device = space.device
    expert_R = expert_of_row_R.to(device=device, dtype=torch.int64)
    rows = space.shape[0]
    if search_RD is not None and search_RD.shape[0] != rows:
        raise ValueError(f"search_RD has {search_RD.shape[0]} rows, x_RH {rows}")
    if expert_R.shape != (rows,):
        raise ValueError(f"expert_of_row_R has shape {tuple(expert_R.shape)}, expected ({rows},)")
    if not 0 < split_fraction <= 1:
        raise ValueError(f"split_fraction must lie in (0, 1], got {split_fraction}")
    if rows and (int(expert_R.min()) < 0 or int(expert_R.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts})")
    if rows > 1 and bool((expert_R[1:] < expert_R[:-1]).any()):
        raise ValueError("rows must be sorted by expert")
    rows_E = torch.bincount(expert_R, minlength=num_experts)
    budget_E = budget_E.to(device=device, dtype=torch.int64)
    if bool(((budget_E < 1) & (rows_E > 0)).any()):
        raise ValueError("every expert with rows needs a budget of at least one cluster")
    if rows == 0:
        return canonical_numbering(expert_R, expert_R, num_experts)
    target_E = torch.minimum(budget_E, rows_E)
    with torch.no_grad():
        x32_RH = None if x_RH is None else x_RH.detach().float()
        search_RD = (sketch_rows(x32_RH, sketch_dim) if search_RD is None
                     else search_RD.detach().float())
        cluster_R = _initial_partition(expert_R, target_E, init_cluster_of_row_R)
        cluster_R = _split_rounds(search_RD, expert_R, cluster_R, target_E, power_iters,
                                  refine_iters, float(split_fraction), float(sse_ratio))
        return _lloyd(x32_RH, search_RD, expert_R, cluster_R, num_experts, lloyd_iters)


__all__ = ["cluster_budget", "cluster_to_budget", "lloyd_refine", "canonical_numbering",
           "cluster_centroids", "distortion", "sketch_basis", "sketch_rows"]
