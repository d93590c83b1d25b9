"""Autograd collectives over a tensor-parallel group (Megatron's conjugate f/g operators).

Every function takes the group explicitly; ``group=None`` means "this rank alone" (TP size 1
or torch.distributed not initialised) and the function is the identity. Each operator is an
autograd Function whose backward is the *conjugate* collective, so a layer built from them
gets exact gradients without any hand-written communication in the layer itself:

=========================================== =========================== ======================
function                                    forward                     backward
=========================================== =========================== ======================
copy_to_tensor_parallel_region (f)          identity                    all-reduce
reduce_from_tensor_parallel_region (g)      all-reduce                  identity
scatter_to_tensor_parallel_region           split last dim, keep mine   all-gather last dim
gather_from_tensor_parallel_region          all-gather last dim         split last dim
scatter_to_sequence_parallel_region         split dim 0, keep mine      all-gather dim 0
gather_from_sequence_parallel_region        all-gather dim 0            reduce-scatter dim 0
                                                                        (or split, see flag)
reduce_scatter_to_sequence_parallel_region  reduce-scatter dim 0        all-gather dim 0
=========================================== =========================== ======================

Sequence-parallel activations are sequence-first (``[s, b, h]``, as in Megatron), so the
sequence is dim 0 and every rank holds ``s / tp`` consecutive positions, in rank order.

Backends: NCCL has native all-gather / reduce-scatter into one tensor. Gloo does not in older
torch releases (the project supports torch >= 2.1), so there reduce-scatter is an all-reduce
followed by keeping this rank's slice, and all-gather uses the list form. Both give the same
numbers; the gloo path only moves more bytes, which does not matter for CPU tests.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def group_size(group: Optional[ProcessGroup]) -> int:
    """Ranks in ``group``; 1 for ``None`` (this rank alone)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    """This rank's index inside ``group``; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


def _is_nccl(group: ProcessGroup) -> bool:
    return dist.get_backend(group) == "nccl"


# --- plain (non-autograd) collectives; each returns a new tensor, never touches its input ---

def _all_reduce(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    # A copy: the input may be saved by another autograd node or shared by several consumers.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _split_along_dim(x: torch.Tensor, dim: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size != 0:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the "
                         f"tensor-parallel size ({size})")
    chunk = x.shape[dim] // size
    return x.narrow(dim, group_rank(group) * chunk, chunk).contiguous()


def _gather_along_dim(x: torch.Tensor, dim: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    if dim == 0 and _is_nccl(group):
        out = torch.empty((size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype,
                          device=x.device)
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter_along_first_dim(x: torch.Tensor,
                                    group: Optional[ProcessGroup]) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[0] % size != 0:
        raise ValueError(f"dimension 0 of size {x.shape[0]} is not divisible by the "
                         f"tensor-parallel size ({size})")
    if _is_nccl(group):
        out = torch.empty((x.shape[0] // size,) + tuple(x.shape[1:]), dtype=x.dtype,
                          device=x.device)
        reduce_scatter = (getattr(dist, "reduce_scatter_single", None)
                          or dist.reduce_scatter_tensor)
        reduce_scatter(out, x.contiguous(), group=group)
        return out
    # gloo: all-reduce + keep my slice (same sums, tp times the bytes).
    return _split_along_dim(_all_reduce(x, group), 0, group)


# --- autograd Functions: forward collective paired with its conjugate in backward ---

class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_dim(grad, -1, ctx.group), None


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_along_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_along_dim(grad, -1, ctx.group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_dim(grad, 0, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_along_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            # Each rank holds a partial gradient of the full sequence: sum, keep my positions.
            return _reduce_scatter_along_first_dim(grad, ctx.group), None, None
        # The gradient is already complete and identical on every rank: just keep my part.
        return _split_along_dim(grad, 0, ctx.group), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_along_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_dim(grad, 0, ctx.group), None


# --- public API ---

def copy_to_tensor_parallel_region(x: torch.Tensor,
                                   group: Optional[ProcessGroup]) -> torch.Tensor:
    """Megatron's f: enter a TP region with a replicated input (identity; all-reduce grads).

    Used before a column-parallel matmul: each rank's weight shard produces a partial
    gradient of the shared input, and the all-reduce in backward sums them.
    """
    if group_size(group) == 1:
        return x
    return _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor,
                                       group: Optional[ProcessGroup]) -> torch.Tensor:
    """Megatron's g: leave a TP region by summing partial results (all-reduce; identity grads).

    Used after a row-parallel matmul: each rank holds a partial sum of the output.
    """
    if group_size(group) == 1:
        return x
    return _ReduceFromTensorParallelRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor,
                                      group: Optional[ProcessGroup]) -> torch.Tensor:
    """Keep this rank's slice of the last dim (all-gather grads): replicated -> TP-split."""
    if group_size(group) == 1:
        return x
    return _ScatterToTensorParallelRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor,
                                       group: Optional[ProcessGroup]) -> torch.Tensor:
    """All-gather the last dim (split grads): TP-split -> replicated, e.g. a gathered output."""
    if group_size(group) == 1:
        return x
    return _GatherFromTensorParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor,
                                        group: Optional[ProcessGroup]) -> torch.Tensor:
    """Keep this rank's ``s / tp`` positions of dim 0 (all-gather grads)."""
    if group_size(group) == 1:
        return x
    return _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup],
                                         tensor_parallel_output_grad: bool = True
                                         ) -> torch.Tensor:
    """All-gather the sequence (dim 0); backward reduce-scatters, or splits.

    ``tensor_parallel_output_grad=True`` (the usual case: the gathered tensor feeds a
    column-parallel matmul, so each rank's gradient is a partial sum) reduce-scatters the
    gradient. Pass ``False`` when the consumer is replicated computation whose gradient is
    already identical on all ranks: backward then only keeps this rank's slice.
    """
    if group_size(group) == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor,
                                               group: Optional[ProcessGroup]) -> torch.Tensor:
    """Sum partial results and keep this rank's positions of dim 0 (all-gather grads).

    The sequence-parallel replacement of g after a row-parallel matmul.
    """
    if group_size(group) == 1:
        return x
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)
