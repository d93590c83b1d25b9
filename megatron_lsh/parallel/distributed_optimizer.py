"""ZeRO-1: AdamW state and fp32 master weights sharded over data-parallel ranks.

The layout is the one :class:`~megatron_lsh.parallel.data_parallel.DistributedDataParallel`
builds with ``use_distributed_optimizer=True``: per gradient buffer, every bucket is padded to a
multiple of the group size and rank ``r`` of the buffer's group (``groups.dp`` for dense
buffers, ``groups.expert_dp`` for expert buffers) owns the ``r``-th equal slice of each bucket.
A parameter that crosses slice boundaries is split; each rank keeps an fp32 master *shard* (and
AdamW's ``exp_avg`` / ``exp_avg_sq`` for it) only for the pieces inside its slices. AdamW is
element-wise, so stepping pieces is the same as stepping whole parameters.

One step, numbered as it happens:

1. (DDP, during backward / ``finish_grad_sync``) each bucket is reduce-scattered, so this rank's
   slice of the fp32 gradient buffer holds the averaged gradient (all-reduce and read the slice
   where the backend lacks reduce-scatter);
2. the master shards take those slices as gradients; fp16: unscale, found-inf all-reduced (MAX)
   over the world, skip the whole step on overflow;
3. grad norm from the shards: squares summed over ``dp`` (``expert_dp`` for experts) first, then
   over the usual model-parallel / ep / pp groups; clipping;
4. AdamW on the master shards;
5. each shard is cast into the slice of the flat parameter buffer, and every bucket's parameter
   slice is all-gathered over the group (asynchronously, all buckets, then waited on); since
   the model's parameters are views of that buffer they are updated in place.

Checkpoints: ``state_dict()`` holds only this rank's shards (masters, AdamW state, the layout
it was saved for, this rank's position in each group and the parameter names) plus the loss
scaler. A checkpoint therefore stores one optimizer file per DP rank
(``<iter>/mp_rank_TT[_PPP][_EEE]/distrib_optim_dpDDD.pt``); ``load_state_dict`` refuses a shard
saved for another layout or group position, and a load into another layout goes through
:meth:`load_resharded_state` instead (``megatron_lsh/training/reshard.py`` assembles each
parameter's state from the shards by name). :meth:`DistributedOptimizer.gather_full_state`
rebuilds the unsharded masters and AdamW state in memory (a collective).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from megatron_lsh.config import OptimizerConfig
from megatron_lsh.parallel.data_parallel import (DistributedDataParallel, GradBuffer,
                                                 all_gather_into)
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.loss_scaler import LossScaler
from megatron_lsh.parallel.optimizer import MixedPrecisionOptimizer

STATE_FORMAT = "megatron_lsh.distributed_optimizer/1"


@dataclass
class _Shard:
    """The piece ``[lo, hi)`` (buffer coordinates) of ``param`` that this rank owns."""

    param: torch.Tensor
    param_index: int
    buffer: GradBuffer
    lo: int
    hi: int
    param_offset: int
    """Start of the piece inside the flattened parameter."""

    @property
    def grad(self) -> torch.Tensor:
        """The piece's slice of the (reduced) fp32 gradient buffer."""
        return self.buffer.grad_data[self.lo:self.hi]

    @property
    def data(self) -> torch.Tensor:
        """The piece's slice of the parameter buffer (the model parameter's storage)."""
        return self.buffer.param_data[self.lo:self.hi]


class DistributedOptimizer(MixedPrecisionOptimizer):
    """ZeRO-1 AdamW over DDP-wrapped chunks; same API and step phases as the replicated one.

    Every chunk must be a :class:`DistributedDataParallel` built with
    ``use_distributed_optimizer=True``.
    """

    def __init__(self, model_chunks: Sequence[nn.Module], config: OptimizerConfig,
                 groups: ProcessGroups, loss_scaler: Optional[LossScaler] = None,
                 check_for_nonfinite: Optional[bool] = None):
        chunks = [model_chunks] if isinstance(model_chunks, nn.Module) else list(model_chunks)
        for chunk in chunks:
            if not (isinstance(chunk, DistributedDataParallel)
                    and chunk.use_distributed_optimizer):
                raise ValueError("the distributed optimizer needs every model chunk wrapped in "
                                 "DistributedDataParallel(..., use_distributed_optimizer=True)")
        super().__init__(chunks, config, groups, loss_scaler, check_for_nonfinite)

    def _buffers(self) -> list:
        return [b for chunk in self.model_chunks for b in chunk.buffers]

    def _build_main_params(self) -> None:
        """Find this rank's pieces of every bucket and make fp32 master shards of them."""
        index = {p: i for i, p in enumerate(self.model_params)}
        self._shards: list[_Shard] = []
        for buffer in self._buffers():
            for bucket in buffer.buckets:
                own_lo, own_hi = bucket.shard_range(buffer.group_rank)
                for p in bucket.params:
                    p_lo, p_hi = buffer.param_range[p]
                    lo, hi = max(p_lo, own_lo), min(p_hi, own_hi)
                    if lo < hi:
                        self._shards.append(_Shard(p, index[p], buffer, lo, hi, lo - p_lo))
        self._main_params = [s.data.detach().clone().float() for s in self._shards]
        self._attr_params = [s.param for s in self._shards]
        self._decays = [s.param.ndim > 1 for s in self._shards]
        self._grad_norm_dp_sharded = True

    def _load_main_grads(self) -> None:
        for shard, main in zip(self._shards, self._main_params):
            g = shard.grad
            main.grad = g if g.dtype == torch.float32 else g.float()

    @torch.no_grad()
    def _copy_main_to_model(self) -> None:
        """Write the updated shards into the parameter buffer, then all-gather every bucket."""
        for shard, main in zip(self._shards, self._main_params):
            shard.data.copy_(main)
        self._all_gather_buckets(lambda bucket: bucket.param_data)

    def _all_gather_buckets(self, flat_of) -> None:
        """All-gather, per bucket, each rank's slice of ``flat_of(bucket)`` into the whole of it."""
        handles = []
        for buffer in self._buffers():
            if buffer.group is None:
                continue
            for bucket in buffer.buckets:
                flat = flat_of(bucket)
                lo, hi = bucket.shard_range(buffer.group_rank)
                mine = flat[lo - bucket.start:hi - bucket.start].clone()
                handles.append(all_gather_into(flat, mine, buffer.group, async_op=True))
        for handle in handles:
            handle.wait()

    @torch.no_grad()
    def gather_full_state(self) -> list:
        """Unsharded fp32 masters and AdamW state, one dict per model parameter (collective).

        Entry ``i`` (aligned with ``self.model_params``) maps ``"param"``, ``"exp_avg"`` and
        ``"exp_avg_sq"`` to full-shape fp32 tensors; state not created yet is zeros. Every rank
        of every DP / expert-DP group must call it.
        """
        keys = ("param", "exp_avg", "exp_avg_sq")  # fixed: every rank runs the same collectives
        position = {p: i for i, p in enumerate(self.model_params)}
        shards_of = {}
        for shard, main in zip(self._shards, self._main_params):
            shards_of.setdefault(id(shard.buffer), []).append((shard, main))
        full = [dict() for _ in self.model_params]
        for buffer in self._buffers():
            for key in keys:
                flat = torch.zeros(buffer.numel, dtype=torch.float32,
                                   device=buffer.grad_data.device)
                for shard, main in shards_of.get(id(buffer), []):
                    value = main if key == "param" else self.optimizer.state.get(main, {}).get(key)
                    if value is not None:
                        flat[shard.lo:shard.hi].copy_(value)
                if buffer.group is not None:
                    handles = [all_gather_into(flat[b.start:b.end],
                                               flat[slice(*b.shard_range(buffer.group_rank))]
                                               .clone(), buffer.group, async_op=True)
                               for b in buffer.buckets]
                    for handle in handles:
                        handle.wait()
                for p in buffer.params:
                    lo, hi = buffer.param_range[p]
                    full[position[p]][key] = flat[lo:hi].view(p.shape).clone()
        return full

    def _layout(self) -> list:
        return [(s.param_index, tuple(s.param.shape), s.param_offset, s.hi - s.lo)
                for s in self._shards]

    def _positions(self) -> list:
        return [(b.is_expert, b.group_rank, b.group_size) for b in self._buffers()]

    def state_dict(self) -> dict:
        """This rank's shards only: layout, group positions, masters, AdamW state, loss scaler."""
        return {
            "format": STATE_FORMAT,
            "layout": self._layout(),
            "positions": self._positions(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "loss_scaler": self.loss_scaler.state_dict(),
            "main_params": [m.detach().clone() for m in self._main_params],
            "param_names": self.param_names,
        }

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Copy this rank's slices of the model's weights into its fp32 master shards."""
        for shard, main in zip(self._shards, self._main_params):
            main.copy_(shard.data)

    @torch.no_grad()
    def load_resharded_state(self, value_of, step_of) -> None:
        """As :meth:`MixedPrecisionOptimizer.load_resharded_state`, for this rank's shards:
        each takes its flat slice of the parameter's local value; then the buffers are
        all-gathered so every rank's parameters hold the loaded weights."""
        for shard, main in zip(self._shards, self._main_params):
            lo, hi = shard.param_offset, shard.param_offset + main.numel()
            main.copy_(value_of(shard.param, "master").reshape(-1)[lo:hi])
            self._set_adam_state(main, step_of(shard.param),
                                 value_of(shard.param, "exp_avg").reshape(-1)[lo:hi],
                                 value_of(shard.param, "exp_avg_sq").reshape(-1)[lo:hi])
        self._copy_main_to_model()

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore this rank's shard; the parameter buffer is refilled (and all-gathered)."""
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(f"optimizer checkpoint has format {state_dict.get('format')!r}, "
                             f"the distributed optimizer needs {STATE_FORMAT!r}")
        if [tuple(x) for x in state_dict["positions"]] != self._positions():
            raise ValueError(f"optimizer shard was saved at (is_expert, group rank, group size) "
                             f"{state_dict['positions']}, this rank is at {self._positions()}: "
                             f"resharding needs gather_full_state()")
        if [(i, tuple(s), o, n) for i, s, o, n in state_dict["layout"]] != self._layout():
            raise ValueError("optimizer shard was saved for a different parameter layout "
                             "(model, bucket size or parallel sizes changed)")
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state_dict["optimizer"])
        self.loss_scaler.load_state_dict(state_dict["loss_scaler"])
        for main, saved in zip(self._main_params, state_dict["main_params"]):
            main.copy_(saved)
        self._copy_main_to_model()
