"""``lsh``: send one centroid per (destination expert, LSH bucket); rebuild every row on the sender.

Rows of one expert are clustered by L cross-polytope (or spherical-plane) hashes and only
the cluster centroids cross the all-to-all, in the forward and, as their gradients, in the
backward; the pure functions are in :mod:`.lsh_ops`. Each row's output is rebuilt from its
centroid's expert output, with residual compensation ``E(c) + (x - c)``, scaled compensation
``E(c) + alpha_e (x - c)``, first-order (linear) compensation ``E(c) + B_e P_e^T (x - c)`` or
none (``E(c)``). The rotations are buffers (saved in the state dict, identical on every rank,
optionally redrawn every N iterations through ``set_iteration``).

Two modes set how many centroids are sent: fixed L (the paper: one centroid per non-empty
bucket, so the byte count is an outcome that drifts with the data), or a target rate R:
exactly ``ceil(R x rows)`` centroids per expert, the LSH buckets refined by error-driven
splits (:mod:`.clustering`), so the byte count is a setting. The centroids can travel as
bf16 / fp8 (``wire_dtype``), stacking the ``cast`` codecs under LSH.

The combine works token-major: centroids are summed straight from the tokens and the
combine gathers centroid outputs per top-k slot and adds the residual in one pass over the
tokens, so no row-sized tensor (tokens x top-k copies) is ever built, forward or backward.

Hashing shares the router's matmul: the rotations are the compressor's ``router_columns``,
so the projections ``x @ R`` come out of the router's one pass over the tokens. In the
target-rate mode the clustering's random sketch (``clustering.sketch_basis``, when H exceeds
its width) rides along too: the tokens are projected once, in that matmul, and the sketch of
each row is a gather of its token's, so no ``[rows, H]`` copy is ever made (unless Lloyd
passes, which check moves in H dimensions, are asked for).

Legend: T tokens, K top-k, R rows, C clusters, H hidden, E experts, Q router columns (L*m).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_lsh.config import (check_choice, check_non_negative, check_positive, require,
                                 setting)
from megatron_lsh.moe.compressors import clustering, lsh_ops, register_compressor
from megatron_lsh.moe.compressors.base import Compressor, Rows
from megatron_lsh.moe.compressors.codecs import CODECS
from megatron_lsh.parallel.random import mix_seed


COMPENSATIONS = ("residual", "scaled", "linear", "none")


@dataclass
class LSHOptions:
    """Settings of the ``lsh`` compressor."""

    num_hashes: int = setting(
        6, "--moe-lsh-num-hashes", "LSH functions concatenated into one bucket key (L); with "
        "--moe-lsh-target-rate they give the initial clusters (0: start from one per expert).")
    hash_type: str = setting("cross_polytope", "--moe-lsh-hash-type", "LSH family.",
                             choices=lsh_ops.HASH_TYPES)
    rotation_dim: int = setting(
        1, "--moe-lsh-rotation-dim",
        "Width m of each random rotation (codes take 2m values); with L=6 on Shakespeare "
        "hidden states m=1 sends ~6%% of the rows, m=2 already ~55%%.")
    compensation: str = setting(
        "none", "--moe-lsh-compensation", "How a row is rebuilt from its centroid c: none "
        "E(c); residual E(c) + (x - c) (the paper's; measured to over-correct: +6.7%% "
        "validation loss on the small GPT-MoE); scaled E(c) + alpha_e (x - c) with alpha_e the "
        "expert's slope estimated from the sender's own centroids; linear "
        "E(c) + B_e P_e^T (x - c), a rank-r linear model of each expert fitted on the same "
        "centroids (--moe-lsh-linear-rank).",
        choices=COMPENSATIONS, aliases={"--moe-lsh-no-compensation": "none"})
    linear_rank: int = setting(8, "--moe-lsh-linear-rank",
                               "Rank r of each expert's linear model (compensation linear).")
    target_rate: Optional[float] = setting(
        None, "--moe-lsh-target-rate", "Send exactly ceil(R x rows) centroids per expert "
        "(per rank, every iteration): LSH buckets refined by error-driven splits; bytes become "
        "a setting. Not given: as many centroids as LSH buckets (the paper's fixed-L mode).")
    lloyd_iters: int = setting(0, "--moe-lsh-lloyd-iters",
                               "Lloyd passes after the splits (with --moe-lsh-target-rate).")
    wire_dtype: Optional[str] = setting(
        None, "--moe-lsh-wire-dtype", "Send the centroids (and their gradients) as bf16, fp8 "
        "(e4m3 + per-row scale) or their -centered forms (see --moe-cast-dtype) instead of the "
        "compute dtype.", choices=(None, *CODECS))
    scope: str = setting(
        "all", "--moe-a2a-compression-scope", "Compress the rows bound for every expert (all), "
        "or only those that leave the node (inter-node: rows for experts on this node's ranks "
        "are sent as they are; the node size comes from torchrun's LOCAL_WORLD_SIZE).",
        choices=("all", "inter-node"))
    redraw_interval: int = setting(0, "--moe-lsh-redraw-interval",
                                   "Redraw the LSH rotations every N iterations (0: never).")
    seed: int = 1234
    """Mixed with each layer's seed to draw that layer's rotations."""
    orthogonal: bool = True
    """Orthonormalise the m columns of each rotation (QR) when m <= hidden size."""

    def __post_init__(self):
        if self.target_rate is None:
            check_positive(self, "num_hashes")
        else:
            check_non_negative(self, "num_hashes")
            require(0.0 < self.target_rate <= 1.0,
                    f"--moe-lsh-target-rate must be in (0, 1], got {self.target_rate}")
        check_positive(self, "rotation_dim", "linear_rank")
        check_non_negative(self, "redraw_interval", "lloyd_iters")
        check_choice(self, "hash_type")
        check_choice(self, "compensation")
        check_choice(self, "wire_dtype")
        check_choice(self, "scope")


@dataclass
class _LSHContext:
    """What LSH keeps between compress and combine."""

    rows: Rows
    centroids_CH: torch.Tensor
    clusters: lsh_ops.Clusters
    cluster_TK: torch.Tensor
    """Cluster of each (token, top-k slot); the dummy id C where the slot sent no row."""
    alpha_E: Optional[torch.Tensor] = None
    """Scaled compensation: the slope used per expert (set by the combine)."""


@register_compressor
class LSHCompressor(Compressor):
    """Send one centroid per (expert, LSH bucket); rebuild rows with residual compensation."""

    name = "lsh"
    Options = LSHOptions
    overhead_stages = ("project", "hash", "cluster", "restore", "compress_bwd", "restore_bwd")
    tp_shared = True

    def __init__(self, options=None, *, hidden_size: int, num_experts: int, seed: int = 0,
                 device=None, same_node_E=None):
        super().__init__(options, hidden_size=hidden_size, num_experts=num_experts,
                         same_node_E=same_node_E)
        o = self.options
        self.seed = mix_seed(o.seed, seed)
        self.codec = CODECS[o.wire_dtype]() if o.wire_dtype else None
        self.register_buffer("rotations", torch.empty(hidden_size, o.num_hashes * o.rotation_dim,
                                                      device=device))
        self.register_buffer("rotation_epoch", torch.zeros((), dtype=torch.int64, device=device))
        # The clustering's fixed sketch basis (derived, so not saved in checkpoints).
        sketch = o.target_rate is not None and hidden_size > clustering.SKETCH_DIM
        self.register_buffer("sketch", torch.empty(hidden_size, clustering.SKETCH_DIM
                                                   if sketch else 0, device=device),
                             persistent=False)
        self._epoch = 0  # host copy of rotation_epoch (no device sync per iteration)
        self.register_load_state_dict_post_hook(self._after_load)
        self.reset_parameters()

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        if not module.rotation_epoch.is_meta:
            module._epoch = int(module.rotation_epoch)

    def _draw(self, epoch: int) -> None:
        o = self.options
        rot = lsh_ops.draw_rotations(self.hidden_size, o.num_hashes, o.rotation_dim,
                                     mix_seed(self.seed, epoch), orthogonal=o.orthogonal)
        with torch.no_grad():
            self.rotations.copy_(rot)
            self.rotation_epoch.fill_(epoch)
        self._epoch = epoch

    def reset_parameters(self) -> None:
        """Draw the epoch-0 rotations and fill the sketch basis (skipped on the meta device)."""
        if not self.rotations.is_meta:
            self._draw(0)
            if self.sketch.shape[1]:
                with torch.no_grad():
                    self.sketch.copy_(clustering.sketch_basis(self.hidden_size,
                                                              self.sketch.shape[1]))

    def set_iteration(self, iteration: int) -> None:
        """Redraw the rotations when ``iteration`` enters a new redraw interval."""
        interval = self.options.redraw_interval
        if interval > 0 and iteration // interval != self._epoch:
            self._draw(iteration // interval)

    def extra_repr(self) -> str:
        o = self.options
        return (f"L={o.num_hashes}, m={o.rotation_dim}, hash={o.hash_type}, "
                f"compensation={o.compensation}, redraw_interval={o.redraw_interval}, "
                f"target_rate={o.target_rate}, wire_dtype={o.wire_dtype}")

    def router_columns(self):
        """The rotations and the sketch basis: the router computes the hash projections (and
        the clustering's sketch) in its matmul."""
        columns = [c for c in (self.rotations, self.sketch) if c.shape[1]]
        if not columns:
            return None
        return columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)

    def _projections(self, rows):
        """``x_TH @ router_columns()``: from the router's matmul when it made them."""
        if rows.router_columns_TQ is not None:
            return rows.router_columns_TQ
        columns = self.router_columns()
        return None if columns is None else rows.x_TH.detach().to(columns.dtype) @ columns

    def compress(self, rows, timer):
        o = self.options
        timer.lap("permute")
        clusters = None
        num_rows = rows.expert_of_row_R.shape[0]
        keep_R = None                   # rows sent as they are (inter-node scope)
        if o.scope == "inter-node" and self.same_node_E is not None:
            keep_R = self.same_node_E.to(rows.expert_of_row_R.device)[rows.expert_of_row_R]
            own_R = torch.where(keep_R, torch.arange(1, num_rows + 1, device=keep_R.device), 0)
        projections_TQ = self._projections(rows)
        hash_width = o.num_hashes * o.rotation_dim
        if o.num_hashes > 0:
            # 1. Hash with all L functions, once per token (its k rows share it), from the
            #    projections the router's matmul produced (or one matmul here).
            codes_TW, radices = lsh_ops.codes_from_projections(
                projections_TQ[:, :hash_width], o.num_hashes, o.rotation_dim, o.hash_type)
            codes_RW = codes_TW.index_select(0, rows.token_of_row_R)
            if keep_R is not None:      # a code column of its own for every kept row
                codes_RW = torch.cat([codes_RW, own_R.unsqueeze(1)], dim=1)
                radices = radices + [num_rows + 1]
            timer.lap("hash")
            # 2. Rows of one expert with the same key form a cluster.
            clusters = lsh_ops.cluster_rows(rows.expert_of_row_R, codes_RW, radices,
                                            self.num_experts)
        if o.target_rate is not None:
            # 2b. A byte budget: exactly ceil(rate x rows) clusters per expert, the buckets
            #     refined (or, over budget, replaced) by error-driven splits.
            budget_E = clustering.cluster_budget(rows.rows_per_expert_E, o.target_rate)
            init_R = None if clusters is None else clusters.cluster_of_row
            if keep_R is not None:      # kept rows: singletons, within budget
                budget_E = torch.where(self.same_node_E.to(budget_E.device),
                                       rows.rows_per_expert_E, budget_E)
                if init_R is None:
                    init_R = torch.where(keep_R, own_R + self.num_experts,
                                         rows.expert_of_row_R)
            # The search space: each row's token sketch, gathered (the rows in H dims only
            # for Lloyd's exact checks); for H <= the sketch width, the rows themselves.
            if self.sketch.shape[1]:
                search_RD = projections_TQ[:, hash_width:].index_select(0, rows.token_of_row_R)
                x_RH = rows.rows_RH if o.lloyd_iters > 0 else None
            else:
                x_RH, search_RD = rows.rows_RH, None
            clusters = lsh_ops.Clusters(*clustering.cluster_to_budget(
                x_RH, rows.expert_of_row_R, budget_E, init_cluster_of_row_R=init_R,
                lloyd_iters=o.lloyd_iters, search_RD=search_RD))
        # 3. Centroids = segment means, summed straight from the tokens (one pass per top-k
        #    slot, no row copies).
        cluster_TK = lsh_ops.cluster_of_slot(clusters, rows.slot_of_row_R, rows.x_TH.shape[0],
                                             rows.topk)
        x_TH = timer.mark(rows.x_TH, "compress_bwd", "in")
        centroids_CH = lsh_ops.token_segment_mean(x_TH, cluster_TK, clusters)
        centroids_CH = timer.mark(centroids_CH, "compress_bwd", "out")
        timer.lap("cluster")
        context = _LSHContext(rows, centroids_CH, clusters, cluster_TK)
        return centroids_CH, clusters.centroids_per_expert, context

    def combine(self, expert_out_PH, context, rows, timer):
        """``out_t = x_t * sum_j g_tj m_tj + sum_j g_tj delta[c_tj]`` over the top-k slots j.

        Token-major: one gather of centroid outputs per slot and one residual pass over the
        tokens, no row-sized tensors. Same value (and exact gradient) as
        :func:`lsh_ops.restore` followed by the weighted sum into tokens. Linear compensation
        adds ``sum_j g_tj B_e P_e^T (x_t - c_tj)`` (:func:`lsh_ops.linear_correction`).
        """
        compensation = self.options.compensation in ("residual", "scaled")
        clusters, cluster_TK = context.clusters, context.cluster_TK
        num_clusters = clusters.num_clusters
        gate_TK = rows.gate_TK()
        if compensation:
            scale_C = None
            if self.options.compensation == "scaled":
                expert_C = lsh_ops.expert_of_cluster(clusters)
                alpha_E = lsh_ops.secant_slopes(context.centroids_CH.detach(),
                                                expert_out_PH.detach(), expert_C,
                                                self.num_experts)
                context.alpha_E = alpha_E
                scale_C = alpha_E.index_select(0, expert_C)
            delta_CH, multi_C = lsh_ops.compensated_delta(expert_out_PH, context.centroids_CH,
                                                          clusters, scale_C)
            multi_TK = torch.cat([multi_C, multi_C.new_zeros(1)])[cluster_TK]
            residual_weight_T = (gate_TK * multi_TK.to(gate_TK.dtype)).sum(-1)
        else:
            delta_CH = expert_out_PH
        timer.lap("restore")
        out_TH = lsh_ops.gather_slots(delta_CH, cluster_TK, gate_TK, num_clusters)
        timer.lap("unpermute")
        if self.options.compensation == "linear":
            rank = self.options.linear_rank
            expert_C = lsh_ops.expert_of_cluster(clusters)
            p_HQ, b_HQ = lsh_ops.linear_surrogates(context.centroids_CH.detach(),
                                                   expert_out_PH.detach(), expert_C,
                                                   self.num_experts, rank)
            x_TH = timer.mark(rows.x_TH, "restore_bwd", "in")
            correction_TH = lsh_ops.linear_correction(x_TH, context.centroids_CH, cluster_TK,
                                                      gate_TK, clusters, expert_C, p_HQ,
                                                      b_HQ, rank)
            out_TH = out_TH + timer.mark(correction_TH, "restore_bwd", "out")
            timer.lap("restore")
        if compensation:
            out_TH = timer.mark(out_TH, "restore_bwd", "in")
            out_TH = lsh_ops.AddScaledTokens.apply(out_TH, rows.x_TH, residual_weight_T)
            out_TH = timer.mark(out_TH, "restore_bwd", "out")
            timer.lap("restore")
        return out_TH

    def statistics(self, context):
        """Mean cosine, residual energy ``|x - c|^2 / |x|^2`` and residual variance
        ``|x - c|^2 / |x - m_e|^2`` of rows to their centroids (:func:`lsh_ops.distortion`),
        and the mean scaled-compensation slope (0-dim tensors; reading syncs)."""
        cos, energy, variance = lsh_ops.distortion(context.rows.x_TH,
                                                   context.rows.token_of_row_R,
                                                   context.centroids_CH, context.clusters)
        out = {"mean_cosine": cos, "residual_energy": energy, "residual_variance": variance}
        if context.alpha_E is not None:
            present = (context.clusters.centroids_per_expert > 1).to(context.alpha_E.dtype)
            out["compensation_alpha"] = ((context.alpha_E * present).sum()
                                         / present.sum().clamp_min(1.0))
        return out
