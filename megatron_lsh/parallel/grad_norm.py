"""Global gradient norm and clipping that count every parameter exactly once.

A model split over TP x PP x DP x EP holds some parameters in several places. The norm must be
that of the unsharded model's gradient, identical on every rank, so each rank adds only the
squares it is responsible for and the partial sums are all-reduced over the groups that hold
*different* pieces:

* dense, TP-sharded (``param.tensor_model_parallel``): each TP rank holds a different slice;
  every rank contributes, summed over the model-parallel group (tp x pp ranks of one replica).
* dense, TP-replicated (biases, norms, sequence-parallel params after their TP all-reduce): the
  TP ranks hold equal copies, so only ``tp_rank == 0`` contributes; summed over model-parallel.
* expert (``param.is_expert``): never TP-sharded; the ranks of the expert-parallel group hold
  different experts, so the squares are summed over ``ep`` and then over ``pp``.
* ``param.shared`` (the last stage's copy of a tied embedding): skipped, its twin on the first
  stage is counted.

Data-parallel replicas hold equal (already reduced) gradients and are not summed, except with the
distributed optimizer (``dp_sharded=True``), where each DP rank holds a different shard of the
reduced gradient: then dense squares are first summed over ``dp`` and expert squares over
``expert_dp``.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_lsh.parallel.dims import ProcessGroups


def param_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The gradient the optimizer uses: ``main_grad`` (fp32 DDP buffer) if set, else ``grad``."""
    main_grad = getattr(param, "main_grad", None)
    return main_grad if main_grad is not None else param.grad


def counts_in_norm(param: torch.Tensor, groups: ProcessGroups) -> bool:
    """Whether this rank adds ``param``'s gradient to the norm (not TP duplicates, tied copies)."""
    if getattr(param, "shared", False):
        return False
    if getattr(param, "is_expert", False) or getattr(param, "tensor_model_parallel", False):
        return True
    return groups.tp_rank == 0


def _all_reduce(value: torch.Tensor, group, op) -> None:
    if group is not None:
        dist.all_reduce(value, op=op, group=group)


def _comm_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    if tensors:
        return tensors[0].device
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_grad_norm(params: Iterable[torch.Tensor], groups: ProcessGroups, norm_type: float = 2.0,
                  grads: Optional[Sequence[Optional[torch.Tensor]]] = None,
                  dp_sharded: bool = False) -> float:
    """Norm of the whole model's gradient, the same float on every rank.

    ``params`` supply the attributes (``is_expert``, ``tensor_model_parallel``, ``shared``);
    ``grads`` (aligned with ``params``) overrides where the gradients are read from (the
    optimizer passes its fp32 master gradients or ZeRO shards); by default
    :func:`param_grad`. ``norm_type`` is 2 (or any p > 0) or ``inf``. Every rank of the world
    must call it (it all-reduces over model-parallel, ep, pp and, if ``dp_sharded``, dp groups).
    """
    params = list(params)
    grads = [param_grad(p) for p in params] if grads is None else list(grads)
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    dense, expert = [], []
    for p, g in zip(params, grads):
        if g is None or not counts_in_norm(p, groups):
            continue
        (expert if getattr(p, "is_expert", False) else dense).append(g)
    device = _comm_device(dense + expert)
    inf_norm = math.isinf(norm_type)
    op = dist.ReduceOp.MAX if inf_norm else dist.ReduceOp.SUM

    def local(tensors) -> torch.Tensor:
        # Partial result in fp64 (a max, or a sum of |g|^p) so many small terms do not lose bits.
        if not tensors:
            return torch.zeros((), dtype=torch.float64, device=device)
        if inf_norm:
            return torch.stack([g.detach().abs().max().to(torch.float64) for g in tensors]).max()
        tensors = [g.detach() for g in tensors]
        try:  # norms of half gradients computed in fp32
            norms = torch._foreach_norm(tensors, norm_type, dtype=torch.float32)
        except TypeError:  # torch without the dtype argument
            norms = [torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in tensors]
        return torch.stack([n.to(torch.float64) for n in norms]).pow(norm_type).sum()

    dense_part, expert_part = local(dense), local(expert)
    if dp_sharded:
        _all_reduce(dense_part, groups.dp, op)
        _all_reduce(expert_part, groups.expert_dp, op)
    _all_reduce(dense_part, groups.model_parallel, op)
    _all_reduce(expert_part, groups.ep, op)
    _all_reduce(expert_part, groups.pp, op)
    if inf_norm:
        return float(torch.maximum(dense_part, expert_part))
    return float((dense_part + expert_part) ** (1.0 / norm_type))


def clip_grads_by_norm(grads: Sequence[Optional[torch.Tensor]], max_norm: float,
                       total_norm: float) -> None:
    """Scale ``grads`` in place by ``max_norm / total_norm`` when that is below 1 (as Megatron)."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    grads = [g for g in grads if g is not None]
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, groups: ProcessGroups,
                   norm_type: float = 2.0,
                   grads: Optional[Sequence[Optional[torch.Tensor]]] = None,
                   dp_sharded: bool = False) -> float:
    """Clip the model's gradients to a global norm of ``max_norm``; returns the norm before.

    Same counting and arguments as :func:`get_grad_norm`; every rank scales its own gradients
    by the same coefficient, so the clipped model is the clipped unsharded model.
    """
    params = list(params)
    grads = [param_grad(p) for p in params] if grads is None else list(grads)
    total_norm = get_grad_norm(params, groups, norm_type, grads=grads, dp_sharded=dp_sharded)
    if max_norm > 0:
        clip_grads_by_norm(grads, max_norm, total_norm)
    return total_norm
