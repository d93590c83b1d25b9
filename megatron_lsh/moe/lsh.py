"""Pure functions of the LSH compression path (DESIGN.md section 4, steps 3 and 7).

* :func:`draw_rotations`: the ``L`` random ``d x m`` rotations, stacked as one ``[d, L*m]``
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
  ``E(c)`` directly, so it matches the uncompressed path bit for bit, and with an identity
  expert every row comes back exactly (``x + (c - c) = x``).

Legend: R rows, H hidden (d), L hash functions, m rotation dim, C clusters (centroids),
E experts, W code columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_lsh.config import ConfigError

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
        raise ConfigError(f"moe_lsh_hash_type must be one of {list(HASH_TYPES)}, "
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
    rows = expert_of_row_R.shape[0]
    device = expert_of_row_R.device
    columns_RW = torch.cat([expert_of_row_R.view(-1, 1), codes_RW], dim=1)
    ids_R, num = bucket_ids(columns_RW, [max(num_experts, 1)] + list(radices))
    row_index_R = torch.arange(rows, device=device)
    first_row_C = torch.full((num,), rows, dtype=torch.int64, device=device)
    first_row_C.scatter_reduce_(0, ids_R, row_index_R, reduce="amin")
    order_C = torch.argsort(first_row_C)
    new_id_C = torch.empty_like(order_C)
    new_id_C[order_C] = torch.arange(num, device=device)
    cluster_of_row = new_id_C[ids_R]
    rows_per_cluster = torch.bincount(cluster_of_row, minlength=num)
    expert_of_cluster = expert_of_row_R[first_row_C[order_C]]
    centroids_per_expert = torch.bincount(expert_of_cluster, minlength=num_experts)
    return Clusters(cluster_of_row, rows_per_cluster, centroids_per_expert)


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
                      clusters: Clusters) -> tuple[torch.Tensor, torch.Tensor]:
    """``(delta_CH, multi_C)`` such that a row's output is ``x * multi + delta``.

    ``delta = E(c) - c`` for clusters of two or more rows and ``E(c)`` for singletons
    (``multi`` is 1 and 0 respectively). A singleton's row is then exactly ``E(c)`` (c == x),
    and with an identity expert every row comes back exactly (``x * 1 + (c - c) = x``).
    """
    multi_C = (clusters.rows_per_cluster > 1).to(expert_out_CH.dtype)
    return expert_out_CH - centroids_CH * multi_C.unsqueeze(1), multi_C


def restore(x_RH: torch.Tensor, centroids_CH: torch.Tensor, expert_out_CH: torch.Tensor,
            clusters: Clusters, compensation: bool = True) -> torch.Tensor:
    """Rebuild every row's expert output from its centroid's: ``x + (E(c) - c)`` or ``E(c)``."""
    cluster_of_row = clusters.cluster_of_row
    if not compensation:
        return expert_out_CH.index_select(0, cluster_of_row)
    delta_CH, multi_C = compensated_delta(expert_out_CH, centroids_CH, clusters)
    multi_R1 = multi_C.index_select(0, cluster_of_row).unsqueeze(1)
    return torch.addcmul(delta_CH.index_select(0, cluster_of_row), x_RH, multi_R1)


def mean_cosine(x_TH: torch.Tensor, token_of_row_R: torch.Tensor, centroids_CH: torch.Tensor,
                clusters: Clusters, max_rows: int = 2048) -> torch.Tensor:
    """Mean cosine similarity of rows (``x_TH[token_of_row]``) to their centroids (0-dim).

    Exact up to ``max_rows`` rows; beyond that it is estimated from ``max_rows`` evenly spaced
    rows, so the statistic stays cheap next to the layer. No autograd.
    """
    with torch.no_grad():
        rows = token_of_row_R.shape[0]
        if rows == 0:
            return torch.ones((), device=x_TH.device)
        idx_S = torch.linspace(0, rows - 1, min(rows, max_rows), device=x_TH.device).long()
        c_SH = centroids_CH.index_select(0, clusters.cluster_of_row.index_select(0, idx_S))
        x_SH = x_TH.index_select(0, token_of_row_R.index_select(0, idx_S))
        cos_S = torch.nn.functional.cosine_similarity(x_SH.float(), c_SH.float(), dim=-1)
        return cos_S.mean()
