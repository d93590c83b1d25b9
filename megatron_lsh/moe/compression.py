"""Compressors: the dispatcher's plug-in that decides what crosses the all-to-all.

A compressor sees this rank's rows already sorted by destination expert (a :class:`Rows`)
and returns the payload to send (plus a per-expert count, from which the split sizes follow)
and a context; after the experts ran and their outputs came back, ``restore`` turns the
returned payload into one output per original row, and ``combine`` sums those rows into their
tokens with the gate weights (the default is ``restore`` then a weighted ``index_add``). LSH
works token-major instead: centroids are summed straight from the tokens and the combine
gathers centroid outputs per top-k slot and adds the residual in one pass over the tokens,
so no row-sized tensor (tokens x top-k copies) is ever built, forward or backward.
It may also give a :class:`WireCodec` that encodes the payload on the wire, in the forward
and for the gradients in the backward.

* :class:`NoCompression` (``none``): the payload is the rows; bitwise the dispatcher without a
  compressor.
* :class:`LSHCompressor` (``lsh``): rows of one expert are clustered by L cross-polytope (or
  spherical-plane) hashes and only the centroids are sent, both ways and in the backward; see
  :mod:`megatron_lsh.moe.lsh`. The rotations are buffers (saved in the state dict, identical
  on every rank, optionally redrawn every N iterations through ``set_iteration``).
* :class:`CastCompressor` (``cast``): every row is sent, encoded as bf16 or as float8 e4m3 with
  one fp32 scale per row (``amax / 448``). The backward sends the gradients encoded the same
  way and treats the round trip as the identity (straight-through): the gradient is that of the
  unquantised computation, evaluated with quantised wire values.

Legend: T tokens, K top-k, R rows, P payload rows, C clusters, H hidden, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from megatron_lsh.config import ConfigError, MoEConfig
from megatron_lsh.moe import lsh
from megatron_lsh.moe.router import mix_seed
from megatron_lsh.moe.stats import StageTimer

_FP8_MAX = 448.0  # largest finite float8 e4m3fn value


@dataclass
class Rows:
    """This rank's dispatch rows, sorted by expert, and the tokens they came from.

    The row copies ``rows_RH = x_TH[token_of_row_R]`` are made on first use only: LSH works
    from the tokens directly and never needs them.
    """

    x_TH: torch.Tensor
    expert_of_row_R: torch.Tensor
    token_of_row_R: torch.Tensor
    gate_of_row_R: torch.Tensor
    rows_per_expert_E: torch.Tensor
    slot_of_row_R: torch.Tensor
    """Position ``t * topk + j`` of each row in the router's ``[T, topk]`` choice matrix."""
    topk: int
    projections_TX: Optional[torch.Tensor] = None
    """``x_TH @ compressor.projection_matrix()``, when the router computed it."""
    _rows_RH: Optional[torch.Tensor] = None

    @property
    def rows_RH(self) -> torch.Tensor:
        """The rows (one token copy per (token, expert) pair), gathered on first use."""
        return self.gather_rows()

    def gather_rows(self) -> torch.Tensor:
        """Gather the row copies now (once) and return them."""
        if self._rows_RH is None:
            self._rows_RH = self.x_TH.index_select(0, self.token_of_row_R)
        return self._rows_RH


def weighted_sum_into_tokens(rows_RH: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``out[t] = sum of gate_r * rows_RH[r]`` over the rows r of token t (the unpermute)."""
    weighted_RH = rows_RH * rows.gate_of_row_R.to(rows_RH.dtype).unsqueeze(1)
    out_TH = rows_RH.new_zeros((rows.x_TH.shape[0], rows_RH.shape[1]))
    return out_TH.index_add(0, rows.token_of_row_R, weighted_RH)


class Compressor(nn.Module):
    """Base class and protocol: ``compress`` rows -> payload + context, ``restore`` it back."""

    codec = None
    """Optional WireCodec applied to the payload on the wire (forward and backward)."""

    def compress(self, rows: Rows, timer: StageTimer) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Rows -> (payload_PH sorted by expert, payload_per_expert_E, context)."""
        raise NotImplementedError

    def restore(self, expert_out_PH: torch.Tensor, context: Any, timer: StageTimer
                ) -> torch.Tensor:
        """Expert outputs of the payload -> one output row per original row (same order)."""
        raise NotImplementedError

    def combine(self, expert_out_PH: torch.Tensor, context: Any, rows: Rows,
                timer: StageTimer) -> torch.Tensor:
        """Expert outputs of the payload -> gate-weighted output per token ``[T, H]``."""
        restored_RH = timer.mark(expert_out_PH, "restore_bwd", "in")
        restored_RH = self.restore(restored_RH, context, timer)
        restored_RH = timer.mark(restored_RH, "restore_bwd", "out")
        timer.lap("restore")
        out_TH = weighted_sum_into_tokens(restored_RH, rows)
        timer.lap("unpermute")
        return out_TH

    def cosine(self, context: Any) -> Optional[torch.Tensor]:
        """Mean cosine of rows to what was sent for them (None: exact, i.e. 1)."""
        return None

    def projection_matrix(self) -> Optional[torch.Tensor]:
        """Columns ``[H, X]`` the router should multiply the tokens by in its own matmul, so
        that the compressor gets ``x @ matrix`` without another pass over the tokens."""
        return None

    def set_iteration(self, iteration: int) -> None:
        """Called by the trainer once per iteration (LSH redraws its rotations here)."""


class NoCompression(Compressor):
    """The dense baseline: send every row as it is."""

    def compress(self, rows, timer):
        return rows.rows_RH, rows.rows_per_expert_E, None

    def restore(self, expert_out_PH, context, timer):
        return expert_out_PH


class LSHCompressor(Compressor):
    """Send one centroid per (expert, LSH bucket); rebuild rows with residual compensation."""

    def __init__(self, hidden_size: int, num_experts: int, *, num_hashes: int = 6,
                 rotation_dim: int = 1, hash_type: str = "cross_polytope",
                 compensation: bool = True, redraw_interval: int = 0, seed: int = 1234,
                 orthogonal: bool = True, device=None):
        super().__init__()
        if hash_type not in lsh.HASH_TYPES:
            raise ConfigError(f"moe_lsh_hash_type must be one of {list(lsh.HASH_TYPES)}, "
                              f"got {hash_type!r}")
        if num_hashes < 1 or rotation_dim < 1:
            raise ConfigError(f"moe_lsh_num_hashes ({num_hashes}) and moe_lsh_rotation_dim "
                              f"({rotation_dim}) must be positive")
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.num_hashes, self.rotation_dim, self.hash_type = num_hashes, rotation_dim, hash_type
        self.compensation, self.redraw_interval = compensation, redraw_interval
        self.seed, self.orthogonal = seed, orthogonal
        self.register_buffer("rotations", torch.empty(hidden_size, num_hashes * rotation_dim,
                                                      device=device))
        self.register_buffer("rotation_epoch", torch.zeros((), dtype=torch.int64, device=device))
        self._epoch = 0  # host copy of rotation_epoch (no device sync per iteration)
        self.register_load_state_dict_post_hook(self._after_load)
        self.reset_parameters()

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        if not module.rotation_epoch.is_meta:
            module._epoch = int(module.rotation_epoch)

    def _draw(self, epoch: int) -> None:
        rot = lsh.draw_rotations(self.hidden_size, self.num_hashes, self.rotation_dim,
                                 mix_seed(self.seed, epoch), orthogonal=self.orthogonal)
        with torch.no_grad():
            self.rotations.copy_(rot)
            self.rotation_epoch.fill_(epoch)
        self._epoch = epoch

    def reset_parameters(self) -> None:
        """Draw the epoch-0 rotations (skipped on the meta device)."""
        if not self.rotations.is_meta:
            self._draw(0)

    def set_iteration(self, iteration: int) -> None:
        """Redraw the rotations when ``iteration`` enters a new redraw interval."""
        if self.redraw_interval > 0:
            epoch = iteration // self.redraw_interval
            if epoch != self._epoch:
                self._draw(epoch)

    def extra_repr(self) -> str:
        return (f"L={self.num_hashes}, m={self.rotation_dim}, hash={self.hash_type}, "
                f"compensation={self.compensation}, redraw_interval={self.redraw_interval}")

    def projection_matrix(self):
        """The rotations: the router computes the hash projections in its matmul."""
        return self.rotations

    def compress(self, rows, timer):
        # 1. Hash with all L functions, once per token (its k rows share it), from the
        #    projections the router's matmul produced (or one matmul here).
        projections_TX = rows.projections_TX
        if projections_TX is None:
            projections_TX = rows.x_TH.detach().to(self.rotations.dtype) @ self.rotations
        codes_TW, radices = lsh.codes_from_projections(projections_TX, self.num_hashes,
                                                       self.rotation_dim, self.hash_type)
        codes_RW = codes_TW.index_select(0, rows.token_of_row_R)
        timer.lap("hash")
        # 2. Cluster rows of one expert with the same key; centroids = segment means, summed
        #    straight from the tokens (one pass per top-k slot, no row copies).
        clusters = lsh.cluster_rows(rows.expert_of_row_R, codes_RW, radices, self.num_experts)
        cluster_TK = lsh.cluster_of_slot(clusters, rows.slot_of_row_R, rows.x_TH.shape[0],
                                         rows.topk)
        x_TH = timer.mark(rows.x_TH, "compress_bwd", "in")
        centroids_CH = lsh.token_segment_mean(x_TH, cluster_TK, clusters)
        centroids_CH = timer.mark(centroids_CH, "compress_bwd", "out")
        timer.lap("cluster")
        context = _LSHContext(rows, centroids_CH, clusters, cluster_TK)
        return centroids_CH, clusters.centroids_per_expert, context

    def restore(self, expert_out_PH, context, timer):
        return lsh.restore(context.rows.rows_RH, context.centroids_CH, expert_out_PH,
                           context.clusters, self.compensation)

    def combine(self, expert_out_PH, context, rows, timer):
        """``out_t = x_t * sum_j g_tj m_tj + sum_j g_tj delta[c_tj]`` over the top-k slots j.

        Token-major: one gather of centroid outputs per slot and one residual pass over the
        tokens, no row-sized tensors. Same value (and exact gradient) as :meth:`restore`
        followed by the weighted sum into tokens.
        """
        clusters, cluster_TK = context.clusters, context.cluster_TK
        num_tokens, num_clusters = rows.x_TH.shape[0], clusters.num_clusters
        gate_TK = rows.gate_of_row_R.new_zeros(num_tokens * rows.topk).scatter(
            0, rows.slot_of_row_R, rows.gate_of_row_R).view(num_tokens, rows.topk)
        if self.compensation:
            delta_CH, multi_C = lsh.compensated_delta(expert_out_PH, context.centroids_CH,
                                                      clusters)
            multi_TK = torch.cat([multi_C, multi_C.new_zeros(1)])[cluster_TK]
            residual_weight_T = (gate_TK * multi_TK.to(gate_TK.dtype)).sum(-1)
        else:
            delta_CH = expert_out_PH
        timer.lap("restore")
        out_TH = None
        if num_clusters > 0:
            # Unused slots point at the dummy cluster C; their gate is 0, any row will do.
            index_TK = cluster_TK.clamp(max=num_clusters - 1)
            for j in range(rows.topk):
                term = (delta_CH.index_select(0, index_TK[:, j])
                        * gate_TK[:, j].to(delta_CH.dtype).unsqueeze(1))
                out_TH = term if out_TH is None else out_TH + term
        if out_TH is None:  # no rows: a no-op that still connects the (empty) expert outputs
            out_TH = expert_out_PH.new_zeros((num_tokens, expert_out_PH.shape[1])).index_add(
                0, cluster_TK.new_zeros(0), expert_out_PH)
        timer.lap("unpermute")
        if self.compensation:
            out_TH = timer.mark(out_TH, "restore_bwd", "in")
            out_TH = _AddScaledTokens.apply(out_TH, rows.x_TH, residual_weight_T)
            out_TH = timer.mark(out_TH, "restore_bwd", "out")
            timer.lap("restore")
        return out_TH

    def cosine(self, context):
        return lsh.mean_cosine(context.rows.x_TH, context.rows.token_of_row_R,
                               context.centroids_CH, context.clusters)


@dataclass
class _LSHContext:
    """What LSH keeps between compress and combine."""

    rows: Rows
    centroids_CH: torch.Tensor
    clusters: lsh.Clusters
    cluster_TK: torch.Tensor
    """Cluster of each (token, top-k slot); the dummy id C where the slot sent no row."""


class _AddScaledTokens(torch.autograd.Function):
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


class Bf16Codec:
    """Rows travel as bfloat16 (2 bytes per value)."""

    def encode(self, x_NH: torch.Tensor) -> torch.Tensor:
        """Round to bf16."""
        return x_NH.to(torch.bfloat16)

    def decode(self, wire_NH: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Widen back to the compute dtype."""
        return wire_NH.to(dtype)

    def row_bytes(self, hidden: int, dtype: torch.dtype) -> int:
        """Two bytes per value."""
        return 2 * hidden


class Fp8Codec:
    """Rows travel as float8 e4m3fn bytes plus one fp32 scale per row: ``[N, H + 4]`` uint8."""

    def encode(self, x_NH: torch.Tensor) -> torch.Tensor:
        """Scale each row so its largest magnitude is 448, cast to e4m3, append the scale."""
        xf = x_NH.float()
        amax_N1 = xf.abs().amax(dim=-1, keepdim=True) if xf.shape[1] else xf.new_zeros(
            (xf.shape[0], 1))
        scale_N1 = torch.where(amax_N1 > 0, amax_N1 / _FP8_MAX, torch.ones_like(amax_N1))
        q_NH = (xf / scale_N1).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.cat([q_NH, scale_N1.contiguous().view(torch.uint8)], dim=1)

    def decode(self, wire_NB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Bytes -> e4m3 values times their row's scale."""
        hidden = wire_NB.shape[1] - 4
        q_NH = wire_NB[:, :hidden].contiguous().view(torch.float8_e4m3fn)
        scale_N1 = wire_NB[:, hidden:].contiguous().view(torch.float32)
        return (q_NH.float() * scale_N1).to(dtype)

    def row_bytes(self, hidden: int, dtype: torch.dtype) -> int:
        """One byte per value plus a 4-byte scale."""
        return hidden + 4


class CastCompressor(NoCompression):
    """Send every row in a narrower wire format (bf16, or fp8 with a per-row scale)."""

    def __init__(self, cast_dtype: str = "bf16"):
        super().__init__()
        if cast_dtype not in ("bf16", "fp8"):
            raise ConfigError(f"moe_cast_dtype must be 'bf16' or 'fp8', got {cast_dtype!r}")
        self.cast_dtype = cast_dtype
        self.codec = Bf16Codec() if cast_dtype == "bf16" else Fp8Codec()

    def extra_repr(self) -> str:
        return f"cast_dtype={self.cast_dtype}"


def build_compressor(moe_config: MoEConfig, hidden_size: int, *, seed: int = 0,
                     device=None) -> Compressor:
    """The compressor ``moe_config.a2a_compression`` names; LSH rotations seeded per layer."""
    kind = moe_config.a2a_compression
    if kind == "none":
        return NoCompression()
    if kind == "cast":
        return CastCompressor(moe_config.cast_dtype)
    if kind == "lsh":
        return LSHCompressor(hidden_size, moe_config.num_experts,
                             num_hashes=moe_config.lsh_num_hashes,
                             rotation_dim=moe_config.lsh_rotation_dim,
                             hash_type=moe_config.lsh_hash_type,
                             compensation=moe_config.lsh_compensation,
                             redraw_interval=moe_config.lsh_redraw_interval,
                             seed=mix_seed(moe_config.lsh_seed, seed), device=device)
    raise ConfigError(f"moe_a2a_compression must be one of ['cast', 'lsh', 'none'], got {kind!r}")
