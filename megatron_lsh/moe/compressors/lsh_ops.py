"""Pure functions of the LSH compression path (docs/ARCHITECTURE.md, steps 3 and 7).

* :func:`draw_rotations`: the ``L`` random ``H x m`` rotations, stacked as one ``[H, L*m]``
  matrix so that hashing every row for every function is a single matmul.
* :func:`hash_codes` / :func:`codes_from_projections`: cross-polytope codes
  ``h_l(x) = argmax [R_l x, -R_l x]`` (2m values per function), or spherical-plane codes (the
  m sign bits of ``R_l x``, the paper's ablation). Both are scale invariant, so rows need no
  normalisation. In the layer the projections ``x @ R_all`` come out of the router's matmul
  (one read of the tokens for both), and only the codes are computed here.
* :func:`bucket_ids`: one id per distinct (expert, code_1, ..., code_L) tuple, never by a
  hash that could collide: columns are packed as a radix number only while the product of
  their radices provably fits in 62 bits; when the next column would not fit, the key so far
  is compacted to dense ids (``torch.unique``, ids < rows) and packing continues. L codes of
  2m values can need more than 64 bits (L=10, m=64: 70 bits); the result is still exact.
* :func:`cluster_rows`: rows of one expert with the same key form a cluster; clusters are
  numbered by their first row, so with rows sorted by expert the centroids come out sorted by
  expert too, and when every row is its own cluster the centroids are the rows, in order.
* :func:`segment_mean` / :func:`restore`: centroids as segment means (autograd gives each row
  ``grad / n`` of its cluster) and the rebuild ``y = x + (E(c) - c)`` with residual
  compensation (paper Eq. 4-5), or ``y = E(c)`` without. It is computed as
  ``y = x * multi + delta`` (:func:`compensated_delta`): a singleton cluster (c == x) yields
  ``E(c)`` directly, and with an identity expert every row comes back exactly
  (``x + (c - c) = x``). When every row is its own cluster the layer therefore equals the
  uncompressed path: bit for bit if the hash projections are computed on their own, and to
  rounding (about 1e-8 in fp32) when they come out of the router's fused matmul, whose wider
  product rounds the router logits differently.
* :func:`secant_slopes`: scaled compensation ``y = E(c) + alpha_e (x - c)``. Residual
  compensation assumes the expert's Jacobian is the identity; ``alpha_e`` estimates the
  expert's mean slope along the directions rows differ in, from what the sender already
  holds: pairs of its own centroids of one expert (each with its nearest neighbour) and their
  returned outputs, ``alpha_e = sum <E(c_i) - E(c_j), c_i - c_j> / sum |c_i - c_j|^2``,
  clamped to [0, 1] and used as a constant (no gradient through it).
* :func:`linear_surrogates` / :func:`linear_correction`: first-order compensation
  ``y = E(c) + B_e P_e^T (x - c)``, a rank-r linear model of each expert fitted (ridge
  regression, no gradient) on the same centroids and outputs, in the r directions they spread
  most along; nothing extra crosses the all-to-all.

Legend: R rows, H hidden, L hash functions, m rotation dim, C clusters (centroids),
E experts, W code columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_lsh.config import ConfigError
from megatron_lsh.moe.compressors.clustering import canonical_numbering

HASH_TYPES = ("cross_polytope", "spherical_plane")
_PACK_LIMIT = 2 ** 62          # keys stay below this: int64 with room to spare
_WORD_BITS = 31                # spherical-plane bits per code column (radix <= 2^31)


def draw_rotations(hidden_size: int, num_hashes: int, rotation_dim: int, seed: int, *,
                   orthogonal: bool = True) -> torch.Tensor:
    """``[H, L*m]`` fp32: column block l is the ``H x m`` rotation of hash function l.

    Gaussian entries from a CPU generator seeded with ``seed`` (identical on every rank);
    with ``orthogonal`` the m columns of each block are orthonormalised (QR) when m <= H.
    """
    gen = torch.Generator().manual_seed(int(seed))
    blocks_LHm = torch.randn(num_hashes, hidden_size, rotation_dim, generator=gen)
    if orthogonal and rotation_dim <= hidden_size:
        q_LHm, r_Lmm = torch.linalg.qr(blocks_LHm)
        # Fix QR's sign ambiguity so the result depends on the Gaussian draw only.
        blocks_LHm = q_LHm * torch.sign(torch.diagonal(r_Lmm, dim1=-2, dim2=-1)).unsqueeze(1)
    return blocks_LHm.permute(1, 0, 2).reshape(hidden_size, num_hashes * rotation_dim)


def hash_codes(x_RH: torch.Tensor, rotations_HLm: torch.Tensor, num_hashes: int,
               rotation_dim: int, hash_type: str = "cross_polytope"
               ) -> tuple[torch.Tensor, list[int]]:
    """Codes ``[R, W]`` (int64) and the radix of each column, from one matmul ``x @ R_all``."""
    projections = x_RH.detach().to(rotations_HLm.dtype) @ rotations_HLm
    return codes_from_projections(projections, num_hashes, rotation_dim, hash_type)


def codes_from_projections(projections_RX: torch.Tensor, num_hashes: int, rotation_dim: int,
                           hash_type: str = "cross_polytope") -> tuple[torch.Tensor, list[int]]:
    """Codes ``[R, W]`` and radices from the projections ``x @ R_all`` (``X = L * m``)."""
    if hash_type not in HASH_TYPES:
        raise ConfigError(f"--moe-lsh-hash-type must be one of {list(HASH_TYPES)}, "
                          f"got {hash_type!r}")
    rows, m = projections_RX.shape[0], rotation_dim
    proj_RLm = projections_RX.detach().view(rows, num_hashes, m)
    if hash_type == "cross_polytope":
        # argmax over [p, -p] == (index of the largest |p_j|) + m if that p_j is negative.
        idx_RL = proj_RLm.abs().argmax(dim=-1)
        negative_RL = proj_RLm.gather(-1, idx_RL.unsqueeze(-1)).squeeze(-1) < 0
        return idx_RL + m * negative_RL.long(), [2 * m] * num_hashes
    bits_RLm = (proj_RLm > 0).long()
    words, widths = [], []
    for start in range(0, m, _WORD_BITS):       # m sign bits -> words of <= 31 bits
        width = min(_WORD_BITS, m - start)
        weights = 2 ** torch.arange(width, device=proj_RLm.device, dtype=torch.int64)
        words.append((bits_RLm[..., start:start + width] * weights).sum(-1))
        widths.append(width)
    codes_RW = torch.stack(words, dim=-1).reshape(rows, -1)   # column order (function, word)
    return codes_RW, [2 ** w for _ in range(num_hashes) for w in widths]


def radix_bits(radices: list[int]) -> float:
    """Bits a single radix key over these columns would need (log2 of the product)."""
    return sum(math.log2(r) for r in radices)


def bucket_ids(columns_RW: torch.Tensor, radices: list[int]) -> tuple[torch.Tensor, int]:
    """Dense ids ``[R]`` (and their count) of the distinct rows of ``columns_RW``, no collisions.

    Ids preserve the lexicographic order of the rows (first column most significant).
    """
    rows = columns_RW.shape[0]
    if rows == 0:
        return columns_RW.new_zeros((0,)), 0
    if rows >= 2 ** 31:
        raise ValueError(f"bucket_ids supports fewer than 2^31 rows, got {rows}")
    key_R = torch.zeros(rows, dtype=torch.int64, device=columns_RW.device)
    key_range = 1                                   # key_R < key_range, always
    for w, radix in enumerate(radices):
        if radix > _PACK_LIMIT:
            raise ValueError(f"code radix {radix} is too large to pack")
        if key_range * radix > _PACK_LIMIT:
            # Compact: dense, order-preserving ids < rows, so rows * radix < 2^31 * 2^31.
            _, key_R = torch.unique(key_R, sorted=True, return_inverse=True)
            key_range = int(key_R.max()) + 1
        key_R = key_R * radix + columns_RW[:, w]
        key_range *= radix
    uniq, ids_R = torch.unique(key_R, sorted=True, return_inverse=True)
    return ids_R, int(uniq.numel())


@dataclass
class Clusters:
    """Which cluster each row belongs to, and the cluster counts."""

    cluster_of_row: torch.Tensor        # [R] int64, in [0, C)
    rows_per_cluster: torch.Tensor      # [C] int64
    centroids_per_expert: torch.Tensor  # [E] int64

    @property
    def num_clusters(self) -> int:
        """C, the number of centroids."""
        return int(self.rows_per_cluster.numel())


def cluster_rows(expert_of_row_R: torch.Tensor, codes_RW: torch.Tensor, radices: list[int],
                 num_experts: int) -> Clusters:
    """Group rows with the same (expert, codes); clusters numbered by their first row.

    ``expert_of_row_R`` must be sorted (the dispatcher permutes rows by expert first), so the
    clusters, and hence the centroids, come out sorted by expert.
    """
    columns_RW = torch.cat([expert_of_row_R.view(-1, 1), codes_RW], dim=1)
    ids_R, _ = bucket_ids(columns_RW, [max(num_experts, 1)] + list(radices))
    return Clusters(*canonical_numbering(ids_R, expert_of_row_R, num_experts))


def cluster_of_slot(clusters: Clusters, slot_of_row_R: torch.Tensor, num_tokens: int,
                    topk: int) -> torch.Tensor:
    """``[T, topk]`` cluster of each router choice; the dummy id C where no row was sent."""
    flat = torch.full((num_tokens * topk,), clusters.num_clusters, dtype=torch.int64,
                      device=slot_of_row_R.device)
    return flat.scatter_(0, slot_of_row_R, clusters.cluster_of_row).view(num_tokens, topk)


def token_segment_mean(x_TH: torch.Tensor, cluster_TK: torch.Tensor, clusters: Clusters
                       ) -> torch.Tensor:
    """Centroids ``[C, H]`` summed straight from the tokens, one ``index_add`` per top-k slot.

    Equal to :func:`segment_mean` of the rows ``x_TH[token_of_row]`` (up to summation order)
    without materialising them; slots with the dummy id C land in a discarded extra row.
    """
    num = clusters.num_clusters
    acc_dtype = torch.promote_types(x_TH.dtype, torch.float32)
    x_acc = x_TH.to(acc_dtype)
    sums_CH = x_TH.new_zeros((num + 1, x_TH.shape[1]), dtype=acc_dtype)
    for j in range(cluster_TK.shape[1]):
        sums_CH = sums_CH.index_add(0, cluster_TK[:, j], x_acc)
    counts_C1 = clusters.rows_per_cluster.to(acc_dtype).unsqueeze(1)
    return (sums_CH[:num] / counts_C1).to(x_TH.dtype)


def segment_mean(x_RH: torch.Tensor, clusters: Clusters) -> torch.Tensor:
    """Centroids ``[C, H]``: the mean of each cluster's rows (differentiable, exact grad/n).

    Sums are accumulated in fp32 at least (bf16 rows would lose precision over many rows).
    """
    acc_dtype = torch.promote_types(x_RH.dtype, torch.float32)
    sums_CH = x_RH.new_zeros((clusters.num_clusters, x_RH.shape[1]), dtype=acc_dtype)
    sums_CH = sums_CH.index_add(0, clusters.cluster_of_row, x_RH.to(acc_dtype))
    return (sums_CH / clusters.rows_per_cluster.to(acc_dtype).unsqueeze(1)).to(x_RH.dtype)


def compensated_delta(expert_out_CH: torch.Tensor, centroids_CH: torch.Tensor,
                      clusters: Clusters, scale_C: torch.Tensor = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(delta_CH, multi_C)`` such that a row's output is ``x * multi + delta``.

    ``delta = E(c) - s c`` for clusters of two or more rows and ``E(c)`` for singletons
    (``multi`` is ``s`` and 0 respectively), with ``s = scale_C`` (1 when None: residual
    compensation). A singleton's row is then exactly ``E(c)`` (c == x), and with an identity
    expert and s = 1 every row comes back exactly (``x * 1 + (c - c) = x``).
    """
    multi_C = (clusters.rows_per_cluster > 1).to(expert_out_CH.dtype)
    if scale_C is not None:
        multi_C = multi_C * scale_C.to(multi_C.dtype)
    return expert_out_CH - centroids_CH * multi_C.unsqueeze(1), multi_C


def expert_of_cluster(clusters: Clusters) -> torch.Tensor:
    """``[C]`` the expert of each cluster (clusters are sorted by expert)."""
    per_expert_E = clusters.centroids_per_expert
    return torch.repeat_interleave(torch.arange(per_expert_E.numel(), device=per_expert_E.device),
                                   per_expert_E)


def secant_slopes(centroids_CH: torch.Tensor, expert_out_CH: torch.Tensor,
                  expert_C: torch.Tensor, num_experts: int, max_pairs: int = 256
                  ) -> torch.Tensor:
    """``[E]`` mean slope of each expert along the directions its rows differ in (no grad).

    Up to ``max_pairs`` evenly spaced centroids are each paired with their nearest other
    centroid of the same expert; ``alpha_e = sum <dE, dc> / sum |dc|^2`` over expert e's
    pairs, clamped to [0, 1]; 0 for an expert with fewer than two clusters.
    """
    with torch.no_grad():
        num = centroids_CH.shape[0]
        acc = torch.promote_types(centroids_CH.dtype, torch.float32)
        alpha_E = centroids_CH.new_zeros(num_experts, dtype=acc)
        if num < 2:
            return alpha_E
        c_CH, y_CH = centroids_CH.to(acc), expert_out_CH.to(acc)
        pick_S = torch.linspace(0, num - 1, min(num, max_pairs), device=c_CH.device).long()
        c_SH = c_CH.index_select(0, pick_S)
        dist_SC = (c_SH.square().sum(1, keepdim=True) - 2 * c_SH @ c_CH.t()
                   + c_CH.square().sum(1).unsqueeze(0))
        other = expert_C.index_select(0, pick_S).unsqueeze(1) != expert_C.unsqueeze(0)
        dist_SC = dist_SC.masked_fill(other, float("inf"))
        dist_SC[torch.arange(pick_S.numel(), device=c_CH.device), pick_S] = float("inf")
        near_S = dist_SC.argmin(1)
        valid_S = torch.isfinite(dist_SC.gather(1, near_S.unsqueeze(1)).squeeze(1))
        dc_SH = c_SH - c_CH.index_select(0, near_S)
        dy_SH = y_CH.index_select(0, pick_S) - y_CH.index_select(0, near_S)
        expert_S = expert_C.index_select(0, pick_S)
        num_E = alpha_E.index_add(
            0, expert_S, torch.where(valid_S, (dy_SH * dc_SH).sum(1), 0.0))
        den_E = torch.zeros_like(alpha_E).index_add(
            0, expert_S, torch.where(valid_S, dc_SH.square().sum(1), 0.0))
        return torch.where(den_E > 0, num_E / den_E.clamp_min(1e-30), 0.0).clamp(0.0, 1.0)


LINEAR_RIDGE = 0.01
"""Ridge of :func:`linear_surrogates`, relative to the largest squared singular value."""


def linear_surrogates(centroids_CH: torch.Tensor, expert_out_CH: torch.Tensor,
                      expert_C: torch.Tensor, num_experts: int, rank: int,
                      ridge: float = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_HQ, B_HQ)``, ``Q = E * rank``: a rank-``rank`` linear model of each expert (no grad).

    Fitted per expert e on the sender's own centroids and their returned outputs: with
    ``dc = c - mean(c)``, ``dy = E(c) - mean(E(c))`` over e's clusters and ``dc = U S V^T``,
    ``P_e = V_r`` (the r directions the centroids spread most along) and
    ``B_e = dy^T U_r diag(S_r / (S_r^2 + ridge * S_1^2))``, the ridge regression of dy on
    ``dc P_e``; so ``E(x) ~ E(c) + B_e P_e^T (x - c)`` for x near c. Column block e of P and B
    belongs to expert e; the block is zero where e has fewer than two clusters (and unused
    columns where it has fewer than ``rank + 1``). ``ridge``: default ``LINEAR_RIDGE``.
    """
    ridge = LINEAR_RIDGE if ridge is None else ridge
    with torch.no_grad():
        hidden = centroids_CH.shape[1]
        acc = torch.promote_types(centroids_CH.dtype, torch.float32)
        p_EHr = centroids_CH.new_zeros((num_experts, hidden, rank), dtype=acc)
        b_EHr = torch.zeros_like(p_EHr)
        counts = torch.bincount(expert_C, minlength=num_experts).tolist()
        start = 0
        for e, n in enumerate(counts):      # E small problems of n x H each
            if n >= 2:
                c_nH = centroids_CH[start:start + n].to(acc)
                y_nH = expert_out_CH[start:start + n].to(acc)
                dc_nH, dy_nH = c_nH - c_nH.mean(0), y_nH - y_nH.mean(0)
                u_nk, s_k, vh_kH = torch.linalg.svd(dc_nH, full_matrices=False)
                r = min(rank, int((s_k > s_k[0] * 1e-6).sum()))
                if r > 0:
                    shrink_r = s_k[:r] / (s_k[:r].square() + ridge * s_k[0].square())
                    p_EHr[e, :, :r] = vh_kH[:r].t()
                    b_EHr[e, :, :r] = (dy_nH.t() @ u_nk[:, :r]) * shrink_r
            start += n
        return tuple(t_EHr.permute(1, 0, 2).reshape(hidden, num_experts * rank)
                     for t_EHr in (p_EHr, b_EHr))


def linear_correction(x_TH: torch.Tensor, centroids_CH: torch.Tensor, cluster_TK: torch.Tensor,
                      gate_TK: torch.Tensor, clusters: Clusters, expert_C: torch.Tensor,
                      p_HQ: torch.Tensor, b_HQ: torch.Tensor, rank: int) -> torch.Tensor:
    """``[T, H]`` ``sum_j g_tj B_e P_e^T (x_t - c_tj)`` over the top-k slots (e: the slot's expert).

    ``expert_C``: :func:`expert_of_cluster` of ``clusters`` (the caller has it already).
    Token-major, two matmuls with the ``[H, E*r]`` maps of :func:`linear_surrogates`:
    ``s = x P`` holds every expert's r coordinates of each token; each slot keeps its expert's
    block minus its centroid's, weighted by its gate, and ``W B^T`` sums the slots back into
    tokens. Differentiable in x and the centroids (the maps are constants). Singletons (whose
    centroid is their row) and unused slots (the dummy cluster C) get weight 0, so their term
    and its gradient are exactly zero, not zero up to the rounding of ``x P - c P``.
    """
    num_tokens, topk = cluster_TK.shape
    num_clusters = centroids_CH.shape[0]
    num_experts = p_HQ.shape[1] // rank
    p_HQ, b_HQ = p_HQ.to(x_TH.dtype), b_HQ.to(x_TH.dtype)
    s_TEr = (x_TH @ p_HQ).view(num_tokens, num_experts, rank)
    if num_clusters == 0:       # nothing was sent: a zero that is still connected to x
        return (s_TEr.reshape(num_tokens, -1) * 0) @ b_HQ.t()
    expert_TK = torch.cat([expert_C, expert_C.new_zeros(1)])[cluster_TK]
    index_TKr = expert_TK.unsqueeze(-1).expand(num_tokens, topk, rank)
    q_CEr = (centroids_CH.to(x_TH.dtype) @ p_HQ).view(num_clusters, num_experts, rank)
    q_Cr = q_CEr[torch.arange(num_clusters, device=q_CEr.device), expert_C]
    q_Cr = torch.cat([q_Cr, q_Cr.new_zeros(1, rank)])
    multi_C = (clusters.rows_per_cluster > 1).to(x_TH.dtype)
    weight_TK = gate_TK.to(x_TH.dtype) * torch.cat([multi_C, multi_C.new_zeros(1)])[cluster_TK]
    z_TKr = (s_TEr.gather(1, index_TKr) - q_Cr[cluster_TK]) * weight_TK.unsqueeze(-1)
    w_TEr = torch.zeros_like(s_TEr).scatter_add(1, index_TKr, z_TKr)
    return w_TEr.reshape(num_tokens, num_experts * rank) @ b_HQ.t()


def restore(x_RH: torch.Tensor, centroids_CH: torch.Tensor, expert_out_CH: torch.Tensor,
            clusters: Clusters, compensation: bool = True) -> torch.Tensor:
    """Rebuild every row's expert output from its centroid's: ``x + (E(c) - c)`` or ``E(c)``."""
    cluster_of_row = clusters.cluster_of_row
    if not compensation:
        return expert_out_CH.index_select(0, cluster_of_row)
    delta_CH, multi_C = compensated_delta(expert_out_CH, centroids_CH, clusters)
    multi_R1 = multi_C.index_select(0, cluster_of_row).unsqueeze(1)
    return torch.addcmul(delta_CH.index_select(0, cluster_of_row), x_RH, multi_R1)


def gather_slots(delta_CH: torch.Tensor, cluster_TK: torch.Tensor, gate_TK: torch.Tensor,
                 num_clusters: int) -> torch.Tensor:
    """``out_t = sum_j gate_tj * delta[cluster_tj]`` over the top-k slots, ``[T, H]``.

    One gather per slot, no row-sized tensor. Unused slots point at the dummy cluster C;
    their gate is 0, so any row will do. With no clusters at all the result is a zero
    tensor that is still connected to ``delta_CH`` (so every rank's backward looks alike).
    """
    num_tokens = cluster_TK.shape[0]
    if num_clusters == 0:
        return delta_CH.new_zeros((num_tokens, delta_CH.shape[1])).index_add(
            0, cluster_TK.new_zeros(0), delta_CH)
    index_TK = cluster_TK.clamp(max=num_clusters - 1)
    out_TH = None
    for j in range(cluster_TK.shape[1]):
        term_TH = (delta_CH.index_select(0, index_TK[:, j])
                   * gate_TK[:, j].to(delta_CH.dtype).unsqueeze(1))
        out_TH = term_TH if out_TH is None else out_TH + term_TH
    return out_TH


class AddScaledTokens(torch.autograd.Function):
    """``base + x * w[:, None]`` with a backward that needs no token-sized temporary for ``w``.

    (Autograd's own ``addcmul`` backward materialises ``grad * x`` before reducing it.)
    """

    @staticmethod
    def forward(ctx, base_TH, x_TH, w_T):
        ctx.save_for_backward(x_TH, w_T)
        return torch.addcmul(base_TH, x_TH, w_T.to(x_TH.dtype).unsqueeze(1))

    @staticmethod
    def backward(ctx, grad_TH):
        x_TH, w_T = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_x = grad_TH * w_T.to(grad_TH.dtype).unsqueeze(1)
        if ctx.needs_input_grad[2]:
            grad_w = torch.linalg.vecdot(grad_TH, x_TH).to(w_T.dtype)
        return grad_TH, grad_x, grad_w


def distortion(x_TH: torch.Tensor, token_of_row_R: torch.Tensor, centroids_CH: torch.Tensor,
               clusters: Clusters, max_rows: int = 2048
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean cosine, residual energy, residual variance) of the rows (``x_TH[token_of_row]``)
    to their centroids, as 0-dim tensors (no sync, no autograd).

    Residual energy is ``sum |x - c|^2 / sum |x|^2``; residual variance is
    ``sum |x - c|^2 / sum |x - m_e|^2`` with ``m_e`` the mean of expert e's rows: the share of
    the rows' spread around their expert's mean that the centroids lose (0: lossless, 1: as
    much as sending one mean per expert). Both the cosine and the energy are flattered by a
    direction all rows share (its energy sits in the denominator); the variance is not.
    Exact up to ``max_rows`` rows; beyond that all three are estimated from the same
    ``max_rows`` evenly spaced rows, so the statistics stay cheap next to the layer.
    """
    with torch.no_grad():
        rows = token_of_row_R.shape[0]
        if rows == 0:
            zero = torch.zeros((), device=x_TH.device)
            return torch.ones((), device=x_TH.device), zero, zero.clone()
        idx_S = torch.linspace(0, rows - 1, min(rows, max_rows), device=x_TH.device).long()
        cluster_S = clusters.cluster_of_row.index_select(0, idx_S)
        c_SH = centroids_CH.index_select(0, cluster_S).float()
        x_SH = x_TH.index_select(0, token_of_row_R.index_select(0, idx_S)).float()
        cos = torch.nn.functional.cosine_similarity(x_SH, c_SH, dim=-1).mean()
        sse = (x_SH - c_SH).square().sum()
        expert_S = expert_of_cluster(clusters).index_select(0, cluster_S)
        num_experts = clusters.centroids_per_expert.numel()
        count_E = torch.bincount(expert_S, minlength=num_experts).clamp_min(1).to(x_SH.dtype)
        mean_EH = x_SH.new_zeros((num_experts, x_SH.shape[1])).index_add_(0, expert_S, x_SH)
        spread = (x_SH - (mean_EH / count_E.unsqueeze(1)).index_select(0, expert_S)).square().sum()
        return (cos, sse / x_SH.square().sum().clamp_min(1e-30),
                torch.where(spread > 0, sse / spread.clamp_min(1e-30), torch.zeros_like(sse)))


def mean_cosine(x_TH: torch.Tensor, token_of_row_R: torch.Tensor, centroids_CH: torch.Tensor,
                clusters: Clusters, max_rows: int = 2048) -> torch.Tensor:
    """The mean cosine of :func:`distortion` alone."""
    return distortion(x_TH, token_of_row_R, centroids_CH, clusters, max_rows)[0]
