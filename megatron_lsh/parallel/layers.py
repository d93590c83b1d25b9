"""Tensor-parallel layers: column/row-parallel linears, vocab-parallel embedding and loss.

Megatron's scheme (Shoeybi et al. 2019). An MLP ``h -> 4h -> h`` is a column-parallel linear
(weight split along its output dim, each rank computes ``4h / tp`` features) followed by a
row-parallel linear (weight split along its input dim, each rank produces a partial sum of
the ``h`` outputs), so the block needs one all-reduce forward (g) and one backward (f). With
sequence parallelism the replicated regions between blocks (LayerNorm, dropout, residual)
are split along the sequence instead, and f / g become all-gather / reduce-scatter.

Conventions:

- Activations are sequence-first ``[s, b, h]``; with ``sequence_parallel`` the input of a
  column-parallel layer and the output of a row-parallel layer are ``[s / tp, b, h]``.
- Linear layers return ``(output, bias)`` like Megatron: ``bias`` is ``None`` unless
  ``skip_bias_add``, in which case the bias is *not* added and is returned so the caller can
  fuse it into the next elementwise op (bias-gelu, bias-dropout-add).
- Initialisation does not depend on the TP size: every rank builds the full (master) weight
  on CPU in fp32 with ``init_method`` from the default generator, which
  :func:`megatron_lsh.parallel.random.model_parallel_seed` seeds identically within a TP
  group, and keeps its own shard. A TP=4 model therefore equals the single-process model
  built with the same seed. On ``device="meta"`` nothing is allocated or initialised; call
  ``reset_parameters()`` after ``to_empty()``.
- Parameter attributes read by gradient synchronisation and checkpoint code:
  ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride`` on sharded
  parameters, ``sequence_parallel`` on replicated parameters whose gradients differ per TP
  rank under sequence parallelism (they must be all-reduced over TP).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lsh.parallel.mappings import (
    ProcessGroup, copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region, group_rank, group_size,
    reduce_from_tensor_parallel_region, reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region)

try:  # apex cannot be installed everywhere (not here); it is only a faster LayerNorm.
    from apex.normalization import FusedLayerNorm as _FusedLayerNorm
except Exception:  # noqa: BLE001 - a broken apex build must not break the import
    _FusedLayerNorm = None
try:
    from apex.normalization import FusedRMSNorm as _FusedRMSNorm
except Exception:  # noqa: BLE001
    _FusedRMSNorm = None

InitMethod = Callable[[torch.Tensor], torch.Tensor]
Device = Union[str, torch.device, None]


# --- initialisation helpers ---

def init_method_normal(std: float, generator: Optional[torch.Generator] = None) -> InitMethod:
    """An init function filling a tensor from N(0, std^2) (default generator unless given)."""
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std, generator=generator)
    return init_


def scaled_init_method_normal(std: float, num_layers: int,
                              generator: Optional[torch.Generator] = None) -> InitMethod:
    """N(0, (std / sqrt(2 * num_layers))^2): for output projections feeding the residual.

    Each layer adds two residual branches, so this keeps the residual stream's variance from
    growing with depth (GPT-2 / Megatron).
    """
    return init_method_normal(std / math.sqrt(2.0 * num_layers), generator)


def _is_meta(device: Device) -> bool:
    return device is not None and torch.device(device).type == "meta"


def _mark_sharded(param: torch.Tensor, partition_dim: int, stride: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def _check_divisible(name: str, value: int, tp: int) -> int:
    if value % tp != 0:
        raise ValueError(f"{name} ({value}) is not divisible by tensor-model-parallel-size ({tp})")
    return value // tp


def shard_master_weight(master: torch.Tensor, partition_dim: int, tp_size: int, tp_rank: int,
                        stride: int = 1) -> torch.Tensor:
    """This rank's shard of a full weight along ``partition_dim``.

    With ``stride`` s the dim is cut into ``s * tp_size`` equal chunks and rank r keeps chunks
    r, r + tp_size, ... (concatenated): for a fused weight such as ``[gate; up]`` (s = 2) each
    rank then holds matching slices of both halves.
    """
    if tp_size == 1:
        return master
    length = master.shape[partition_dim]
    if length % (tp_size * stride) != 0:
        raise ValueError(f"dimension {partition_dim} of size {length} is not divisible by "
                         f"tensor-model-parallel-size ({tp_size}) x stride ({stride})")
    chunks = torch.split(master, length // (tp_size * stride), dim=partition_dim)
    return torch.cat(chunks[tp_rank::tp_size], dim=partition_dim)


def unshard_master_weight(shards: Sequence[torch.Tensor], partition_dim: int,
                          stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_master_weight`: every TP rank's shard, in rank order -> the full
    tensor (chunk j of rank r is chunk j * tp_size + r of the full tensor)."""
    if len(shards) == 1:
        return shards[0]
    pieces = [s.chunk(stride, dim=partition_dim) for s in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(shards))],
                     dim=partition_dim)


def gather_master_weight(shard: torch.Tensor, tp_group: Optional[ProcessGroup],
                         partition_dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_master_weight` (a collective): the full tensor on every rank.

    Works for parameters and their gradients alike (pass ``p.partition_dim`` /
    ``p.partition_stride``); used by tests and checkpoint conversion, not in training steps.
    """
    size = group_size(tp_group)
    if size == 1:
        return shard
    shard = shard.detach().contiguous()
    shards = [torch.empty_like(shard) for _ in range(size)]
    dist.all_gather(shards, shard, group=tp_group)
    return unshard_master_weight(shards, partition_dim, stride)


def _init_shard_(param: torch.Tensor, master_shape: tuple, init_method: InitMethod,
                 partition_dim: int, stride: int, tp_group: Optional[ProcessGroup]) -> None:
    # The master is built in fp32 on CPU whatever the parameter's dtype / device, so the
    # random stream consumed (and so every later weight) is the same for every TP size.
    master = torch.empty(master_shape, dtype=torch.float32)
    init_method(master)
    shard = shard_master_weight(master, partition_dim, group_size(tp_group),
                                group_rank(tp_group), stride)
    with torch.no_grad():
        param.copy_(shard)


# --- linear layers ---

class ColumnParallelLinear(nn.Module):
    """``Y = X A + b`` with ``A`` split along its output dim: ``A = [A_1, ..., A_tp]``.

    Input ``[..., input_size]`` replicated on the TP ranks (or ``[s / tp, b, input_size]``
    with ``sequence_parallel``, all-gathered here); output ``[..., output_size / tp]``, or
    the full ``output_size`` with ``gather_output``. Weight ``[output_size / tp, input_size]``
    and bias ``[output_size / tp]`` are sharded (``partition_dim = 0``). ``stride`` > 1 is for
    fused weights (see :func:`shard_master_weight`).
    """

    def __init__(self, input_size: int, output_size: int, *,
                 tp_group: Optional[ProcessGroup] = None, bias: bool = True,
                 gather_output: bool = False, init_method: Optional[InitMethod] = None,
                 stride: int = 1, sequence_parallel: bool = False, skip_bias_add: bool = False,
                 params_dtype: torch.dtype = torch.float32, device: Device = None):
        super().__init__()
        if gather_output and sequence_parallel:
            raise ValueError("ColumnParallelLinear cannot gather its output with sequence "
                             "parallelism (the next layer expects a TP-split input)")
        tp = group_size(tp_group)
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = _check_divisible("output_size", output_size, tp)
        self.tp_group, self.gather_output, self.stride = tp_group, gather_output, stride
        self.sequence_parallel, self.skip_bias_add = sequence_parallel, skip_bias_add
        self.init_method = init_method or init_method_normal(0.02)
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size,
                                               dtype=params_dtype, device=device))
        _mark_sharded(self.weight, 0, stride)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_partition,
                                                 dtype=params_dtype, device=device))
            _mark_sharded(self.bias, 0, stride)
        else:
            self.register_parameter("bias", None)
        if not _is_meta(device):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise this rank's shard from the full master weight; zero the bias."""
        _init_shard_(self.weight, (self.output_size, self.input_size), self.init_method, 0,
                     self.stride, self.tp_group)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return ``(output, bias)``; ``bias`` is not None only with ``skip_bias_add``."""
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp_group,
                                                     tensor_parallel_output_grad=True)
        else:
            x = copy_to_tensor_parallel_region(x, self.tp_group)
        out = F.linear(x, self.weight, None if self.skip_bias_add else self.bias)
        if self.gather_output:
            out = gather_from_tensor_parallel_region(out, self.tp_group)
        return out, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_size={self.output_size}, "
                f"tp={group_size(self.tp_group)}, bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``Y = X A + b`` with ``A`` split along its input dim: ``A = [A_1; ...; A_tp]``.

    Input ``[..., input_size / tp]`` (TP-split, e.g. a column-parallel output) or, with
    ``input_is_parallel=False``, the full input, which is split here. The partial products
    are summed with an all-reduce, or reduce-scattered along the sequence (dim 0) with
    ``sequence_parallel``. Weight ``[output_size, input_size / tp]`` is sharded
    (``partition_dim = 1``); the bias ``[output_size]`` is replicated and added after the
    reduction (with ``sequence_parallel`` it is marked ``sequence_parallel = True``: each rank
    sees different positions, so its gradient must be summed over TP).
    """

    def __init__(self, input_size: int, output_size: int, *,
                 tp_group: Optional[ProcessGroup] = None, bias: bool = True,
                 input_is_parallel: bool = True, init_method: Optional[InitMethod] = None,
                 stride: int = 1, sequence_parallel: bool = False, skip_bias_add: bool = False,
                 params_dtype: torch.dtype = torch.float32, device: Device = None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear with sequence parallelism needs "
                             "input_is_parallel=True")
        tp = group_size(tp_group)
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = _check_divisible("input_size", input_size, tp)
        self.tp_group, self.input_is_parallel, self.stride = tp_group, input_is_parallel, stride
        self.sequence_parallel, self.skip_bias_add = sequence_parallel, skip_bias_add
        self.init_method = init_method or init_method_normal(0.02)
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition,
                                               dtype=params_dtype, device=device))
        _mark_sharded(self.weight, 1, stride)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=params_dtype,
                                                 device=device))
            self.bias.sequence_parallel = sequence_parallel
        else:
            self.register_parameter("bias", None)
        if not _is_meta(device):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise this rank's shard from the full master weight; zero the bias."""
        _init_shard_(self.weight, (self.output_size, self.input_size), self.init_method, 1,
                     self.stride, self.tp_group)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return ``(output, bias)``; ``bias`` is not None only with ``skip_bias_add``."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.tp_group)
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)
        else:
            out = reduce_from_tensor_parallel_region(partial, self.tp_group)
        if self.skip_bias_add:
            return out, self.bias
        return (out + self.bias if self.bias is not None else out), None

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_size={self.output_size}, "
                f"tp={group_size(self.tp_group)}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


# --- embedding, output layer and loss ---

class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over TP: rank r holds rows
    ``[r * V / tp, (r + 1) * V / tp)`` of the ``[V, h]`` table (``partition_dim = 0``).

    Each rank looks up the ids in its range, writes zeros for the others, and the partial
    results are summed over TP. Input ``[b, s]`` ids; output ``[b, s, h]``, or with
    ``reduce_scatter_embeddings`` (sequence parallelism) ``[s / tp, b, h]``: transposed to
    sequence-first and reduce-scattered, which replaces the all-reduce. ``num_embeddings``
    must be divisible by the TP size (the model pads the vocabulary).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 tp_group: Optional[ProcessGroup] = None,
                 init_method: Optional[InitMethod] = None,
                 reduce_scatter_embeddings: bool = False,
                 params_dtype: torch.dtype = torch.float32, device: Device = None):
        super().__init__()
        tp = group_size(tp_group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = _check_divisible("num_embeddings (padded vocab)",
                                                             num_embeddings, tp)
        self.vocab_start_index = group_rank(tp_group) * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.tp_group, self.reduce_scatter_embeddings = tp_group, reduce_scatter_embeddings
        self.init_method = init_method or init_method_normal(0.02)
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim,
                                               dtype=params_dtype, device=device))
        _mark_sharded(self.weight, 0, 1)
        if not _is_meta(device):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise this rank's rows from the full master table."""
        _init_shard_(self.weight, (self.num_embeddings, self.embedding_dim), self.init_method,
                     0, 1, self.tp_group)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed ``[b, s]`` ids: ``[b, s, h]`` (or ``[s / tp, b, h]``, see the class doc)."""
        if group_size(self.tp_group) > 1:
            outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
            local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = F.embedding(input_ids, self.weight)
        if self.reduce_scatter_embeddings:
            # Transposed for every TP size so the output layout never depends on it.
            return reduce_scatter_to_sequence_parallel_region(out.transpose(0, 1).contiguous(),
                                                              self.tp_group)
        return reduce_from_tensor_parallel_region(out, self.tp_group)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"tp={group_size(self.tp_group)}")


def parallel_lm_logits(hidden: torch.Tensor, word_embeddings_weight: torch.Tensor,
                       tp_group: Optional[ProcessGroup], sequence_parallel: bool = False,
                       bias: Optional[torch.Tensor] = None,
                       gather_output: bool = False) -> torch.Tensor:
    """Output layer tied to a :class:`VocabParallelEmbedding`: ``hidden @ E^T``.

    ``hidden`` is ``[s, b, h]`` replicated over TP (``[s / tp, b, h]`` with
    ``sequence_parallel``); the result is this rank's vocabulary slice ``[s, b, V / tp]``,
    ready for :func:`vocab_parallel_cross_entropy` (or the full ``V`` with ``gather_output``,
    for generation). Gradients flow to the (shared) embedding shard.
    """
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tp_group,
                                                      tensor_parallel_output_grad=True)
    else:
        hidden = copy_to_tensor_parallel_region(hidden, tp_group)
    logits = F.linear(hidden, word_embeddings_weight, bias)
    if gather_output:
        logits = gather_from_tensor_parallel_region(logits, tp_group)
    return logits


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross entropy over logits split along the vocabulary; see the public function."""

    @staticmethod
    def forward(ctx, logits, target, group, label_smoothing):
        tp, rank = group_size(group), group_rank(group)
        # 1. Global max for a stable softmax, in at least fp32 (bf16 / fp16 logits upcast).
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logits_max = logits.max(dim=-1).values
        if tp > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)  # a new tensor: reused in place below
        # 2. The target's logit lives on exactly one rank; the others contribute 0.
        vocab_local = shifted.shape[-1]
        vocab = vocab_local * tp
        start = rank * vocab_local
        in_range = (target >= start) & (target < start + vocab_local)
        local_target = (target - start).masked_fill(~in_range, 0)
        predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        predicted = predicted.masked_fill(~in_range, 0.0)
        # 3. One all-reduce for every per-token sum.
        stats = [predicted]
        if label_smoothing > 0:
            stats.append(shifted.sum(dim=-1))
        softmax = shifted.exp_()
        stats.append(softmax.sum(dim=-1))
        stats = torch.stack(stats)
        if tp > 1:
            dist.all_reduce(stats, group=group)
        predicted, sum_exp = stats[0], stats[-1]
        log_sum_exp = torch.log(sum_exp)
        loss = log_sum_exp - predicted
        if label_smoothing > 0:
            # Megatron's form: the target keeps 1 - label_smoothing of the mass and every
            # other id gets label_smoothing / (V - 1); as a mix of NLL and the mean log-prob:
            smoothing = label_smoothing * vocab / (vocab - 1)
            mean_log_probs = stats[1] / vocab - log_sum_exp
            loss = (1.0 - smoothing) * loss - smoothing * mean_log_probs
        else:
            smoothing = 0.0
        softmax.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, in_range)
        ctx.smoothing, ctx.vocab, ctx.used = smoothing, vocab, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("vocab_parallel_cross_entropy: backward reuses the saved "
                               "softmax in place and can run only once (no retain_graph)")
        ctx.used = True
        softmax, local_target, in_range = ctx.saved_tensors
        # d loss / d logits = softmax - (1 - smoothing) * onehot - smoothing / V, computed in
        # place in the saved softmax: it is the largest tensor of the step ([tokens, V / tp]).
        grad = softmax
        onehot_weight = (1.0 - ctx.smoothing) * in_range.to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot_weight.unsqueeze(-1))
        if ctx.smoothing > 0:
            grad.sub_(ctx.smoothing / ctx.vocab)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 tp_group: Optional[ProcessGroup] = None,
                                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token cross entropy of vocabulary-split logits, without gathering them.

    ``logits``: this rank's shard ``[..., V / tp]`` (rank r holds ids ``[r V/tp, (r+1) V/tp)``);
    ``target``: ``[...]`` global ids. Returns the loss ``[...]``, identical on all TP ranks,
    in fp32 for half-precision logits (else in their dtype). Numerically stable (the global
    max is subtracted); the gradient is the exact ``softmax - onehot``. Label smoothing uses
    Megatron's form: the target keeps ``1 - label_smoothing`` of the probability mass and the
    other ``V - 1`` ids share the rest equally (V counts padded ids too). Costs two
    all-reduces of ``[tokens]``-sized tensors. The backward reuses the saved softmax in place
    (it is the largest tensor of the step), so it can run once per forward (no retain_graph).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, label_smoothing)


# --- LayerNorm ---

def build_layernorm(hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False, *,
                    normalization: str = "LayerNorm", params_dtype: torch.dtype = torch.float32,
                    device: Device = None) -> nn.Module:
    """A LayerNorm (weight and bias) or RMSNorm (weight only) over the last dim.

    apex's fused kernel on CUDA when apex is importable, else ``torch.nn.LayerNorm`` /
    ``torch.nn.RMSNorm`` (same parameter names, same maths). Its parameters are replicated
    over TP; with ``sequence_parallel`` each rank normalises different positions, so they are
    marked ``sequence_parallel = True`` and their gradients must be all-reduced over TP.
    """
    fused = {"LayerNorm": _FusedLayerNorm, "RMSNorm": _FusedRMSNorm}.get(normalization)
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise ValueError(f"normalization must be LayerNorm or RMSNorm, got {normalization!r}")
    if fused is not None and torch.cuda.is_available() and not _is_meta(device):
        # apex builds on the current device; it falls back to torch for CPU inputs.
        norm = fused(hidden_size, eps=eps).to(device=device, dtype=params_dtype)
    elif normalization == "RMSNorm":
        norm = nn.RMSNorm(hidden_size, eps=eps, device=device, dtype=params_dtype)
    else:
        norm = nn.LayerNorm(hidden_size, eps=eps, device=device, dtype=params_dtype)
    for param in norm.parameters():
        param.sequence_parallel = sequence_parallel
    return norm
