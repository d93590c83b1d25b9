"""Bucketed data-parallel gradient reduction (our own DDP, with Megatron's semantics).

Layout. The trainable parameters of a model chunk are grouped by
``(dtype, is_expert, sequence_parallel)`` and each group gets one flat, contiguous gradient
buffer (fp32 by default, whatever the parameter dtype). Every parameter's ``param.main_grad`` is
a view into its buffer, so gradients accumulate in fp32 over micro-batches and the optimizer reads
fp32 gradients. Parameters are laid out in *reverse* registration order (the order backward
produces their gradients) and cut into buckets of about ``bucket_size_mb``; a parameter never
straddles two buckets.

Communication, per step (numbered as they happen):

1. Backward. A post-accumulate-grad hook on every parameter adds ``param.grad`` into
   ``param.main_grad`` and frees ``param.grad``. Outside :meth:`no_sync`, the hook also marks
   the parameter ready; when every parameter of a bucket is ready the bucket is launched at
   once, asynchronously, overlapping the rest of backward: it is multiplied by ``1/dp`` and
   all-reduced (SUM) over its group, one collective per bucket. Buckets of one buffer are
   launched strictly in index order, so all ranks of a group issue the same collectives in the
   same order even if hooks fire in a different order.
   Dense buffers reduce over ``groups.dp``; expert buffers over ``groups.expert_dp``.
2. :meth:`finish_grad_sync` (after the last micro-batch's backward):
   a. sequence-parallel parameters (``param.sequence_parallel`` with tp > 1): each TP rank saw
      only its part of the sequence, so their whole buffer is first all-reduced (SUM) over
      ``groups.tp``; only then are their buckets launched over DP (they are never launched from
      hooks);
   b. any bucket not launched yet (unused parameters, ``overlap_grad_reduce=False``) is launched;
   c. every handle is waited on.

Averaging. Each rank's loss must be the *mean* over its own micro-batch, divided by the number of
micro-batches (the trainer does that); the ``1/dp`` factor then turns the sum over DP ranks into
the gradient of the mean loss over the global batch. Expert gradients are scaled by ``1/dp`` too,
not ``1/expert_dp``: an expert replica's gradient already sums the contributions of every rank
of its expert-parallel group (through the all-to-all, tokens of a TP group split among its ranks),
so the sum over the expert-DP group covers each token of the stage exactly once, as the dense
sum over DP does.

With ``use_distributed_optimizer=True`` (ZeRO-1) each bucket is padded to a multiple of
``group_size * shard_alignment`` elements (64 by default, so every slice starts 256-byte aligned)
and rank ``r`` of the group owns the ``r``-th equal slice of every bucket. Gradients are then
reduce-scattered (only the owned slice is reduced; gloo in recent torch has it too); where the
backend lacks ``reduce_scatter_tensor`` (older gloo) the bucket is all-reduced and the optimizer
reads its slice (same result, more bytes). Parameters become views into a flat parameter buffer
with the same layout, so the optimizer's all-gather of updated slices writes the parameters
in place.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megatron_lsh.parallel.dims import ProcessGroups

_reduce_scatter_single = (getattr(dist, "reduce_scatter_single", None)
                          or dist.reduce_scatter_tensor)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_supports_cache: dict = {}
"""Probe answers keyed by (backend, group name): never by the group object, which would keep
every process group (and its gloo threads) alive past ``destroy_process_group`` into interpreter
shutdown, where their teardown can abort the process after it finished its work."""


def _supports_tensor_collectives(group) -> bool:
    """Whether ``group``'s backend has reduce_scatter_tensor and all_gather_into_tensor.

    NCCL always has them. Other backends are probed once with a tiny collective (every member
    of the group constructs DDP together, so every member probes together).
    """
    if group is None:
        return True
    if dist.get_backend(group) == "nccl":
        return True
    key = (dist.get_backend(group), dist._get_process_group_name(group))
    if key not in _supports_cache:
        size = dist.get_world_size(group)
        try:
            probe = torch.zeros(size)
            _reduce_scatter_single(torch.zeros(1), probe, group=group)
            _all_gather_single(probe, torch.zeros(1), group=group)
            _supports_cache[key] = True
        except (RuntimeError, NotImplementedError, ValueError):
            _supports_cache[key] = False
    return _supports_cache[key]


def all_gather_into(output: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False):
    """Concatenate every rank's ``shard`` into ``output`` (falls back to the list form)."""
    if _supports_tensor_collectives(group):
        return _all_gather_single(output, shard, group=group, async_op=async_op)
    return dist.all_gather(list(output.chunk(dist.get_world_size(group))), shard,
                           group=group, async_op=async_op)


class GradBucket:
    """A contiguous range ``[start, end)`` of one :class:`GradBuffer`, reduced by one collective."""

    def __init__(self, buffer: "GradBuffer", index: int, start: int, end: int, params: list):
        self.buffer, self.index, self.start, self.end = buffer, index, start, end
        self.params = params
        self.ready: set = set()
        self.handle = None
        self.launched = False
        self._shard_out: Optional[torch.Tensor] = None

    @property
    def numel(self) -> int:
        """Elements in the bucket, padding included."""
        return self.end - self.start

    @property
    def grad_data(self) -> torch.Tensor:
        """The bucket's slice of the flat gradient buffer."""
        return self.buffer.grad_data[self.start:self.end]

    @property
    def param_data(self) -> torch.Tensor:
        """The bucket's slice of the flat parameter buffer (ZeRO-1 only)."""
        return self.buffer.param_data[self.start:self.end]

    def shard_range(self, group_rank: int) -> tuple[int, int]:
        """Buffer coordinates of the slice owned by ``group_rank`` (ZeRO-1)."""
        size = self.numel // self.buffer.group_size
        return self.start + group_rank * size, self.start + (group_rank + 1) * size

    def launch(self) -> None:
        """Scale by 1/dp and start the asynchronous reduction of this bucket."""
        buf = self.buffer
        data = self.grad_data
        if buf.scale != 1.0:
            data.mul_(buf.scale)
        self.launched = True
        buf.stats["bucket_launches"] += 1
        if buf.group is None:
            return
        buf.stats["collectives"] += 1
        if buf.reduce_scatter:
            self._shard_out = torch.empty(self.numel // buf.group_size, dtype=data.dtype,
                                          device=data.device)
            self.handle = _reduce_scatter_single(self._shard_out, data, group=buf.group,
                                                 async_op=True)
        else:
            self.handle = dist.all_reduce(data, group=buf.group, async_op=True)

    def wait(self) -> None:
        """Wait for the reduction; a reduce-scatter result is copied into the owned slice."""
        if self.handle is not None:
            self.handle.wait()
            self.handle = None
            if self._shard_out is not None:
                lo, hi = self.shard_range(self.buffer.group_rank)
                self.buffer.grad_data[lo:hi].copy_(self._shard_out)
                self._shard_out = None

    def reset(self) -> None:
        """Ready for the next step (the buffer contents are zeroed separately)."""
        self.wait()
        self.ready.clear()
        self.launched = False


class GradBuffer:
    """Flat gradient (and, for ZeRO-1, parameter) storage of parameters of one kind.

    Parameters share ``(dtype, is_expert, sequence_parallel)``; each gets ``main_grad`` as a
    view into ``grad_data``. Dense buffers reduce over ``groups.dp``, expert buffers over
    ``groups.expert_dp``.
    """

    def __init__(self, params: list, groups: ProcessGroups, grad_dtype: torch.dtype,
                 bucket_numel: int, is_expert: bool, sequence_parallel: bool,
                 distributed_optimizer: bool, stats: dict, shard_alignment: int = 64):
        self.params = params
        self.is_expert = is_expert
        self.sequence_parallel = sequence_parallel
        self.param_dtype = params[0].dtype
        self.stats = stats
        self.group = groups.expert_dp if is_expert else groups.dp
        self.group_size = groups.expert_dp_size if is_expert else groups.dp_size
        self.group_rank = dist.get_rank(self.group) if self.group is not None else 0
        self.scale = 1.0 / groups.dp_size  # see the module docstring for why experts use dp too
        self.reduce_scatter = (distributed_optimizer and self.group is not None
                               and _supports_tensor_collectives(self.group))
        pad = self.group_size * shard_alignment if distributed_optimizer else 1

        # Assign each parameter a range; close a bucket once it holds bucket_numel elements.
        self.param_range: dict = {}
        self.buckets: list[GradBucket] = []
        offset, bucket_start, bucket_params = 0, 0, []
        for i, p in enumerate(params):
            self.param_range[p] = (offset, offset + p.numel())
            offset += p.numel()
            bucket_params.append(p)
            if offset - bucket_start >= bucket_numel or i == len(params) - 1:
                end = bucket_start + math.ceil((offset - bucket_start) / pad) * pad
                self.buckets.append(GradBucket(self, len(self.buckets), bucket_start, end,
                                               bucket_params))
                offset, bucket_start, bucket_params = end, end, []
        self.numel = offset
        device = params[0].device
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.param_data: Optional[torch.Tensor] = None
        if distributed_optimizer:
            self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device)
        self.param_bucket: dict = {}
        for bucket in self.buckets:
            for p in bucket.params:
                self.param_bucket[p] = bucket
                lo, hi = self.param_range[p]
                p.main_grad = self.grad_data[lo:hi].view(p.shape)
                if self.param_data is not None:
                    self.param_data[lo:hi].copy_(p.data.reshape(-1))
                    p.data = self.param_data[lo:hi].view(p.shape)
        self.next_launch = 0

    def mark_ready(self, param: torch.Tensor, launch: bool) -> None:
        """Record that ``param``'s gradient for this step is complete; launch full buckets."""
        bucket = self.param_bucket[param]
        if bucket.launched:
            raise RuntimeError(
                "a gradient arrived for a bucket that was already reduced this step: run the "
                "non-final micro-batches under no_sync() and call finish_grad_sync() and "
                "zero_grad_buffer() between steps")
        bucket.ready.add(param)
        if launch:
            self.launch_ready()

    def launch_ready(self) -> None:
        """Launch, in index order, every complete bucket not launched yet."""
        while (self.next_launch < len(self.buckets)
               and len(self.buckets[self.next_launch].ready)
               == len(self.buckets[self.next_launch].params)):
            self.buckets[self.next_launch].launch()
            self.next_launch += 1

    def launch_remaining(self) -> None:
        """Launch, in index order, every bucket not launched yet (complete or not)."""
        for bucket in self.buckets[self.next_launch:]:
            bucket.launch()
        self.next_launch = len(self.buckets)

    def wait(self) -> None:
        """Wait for every launched bucket."""
        for bucket in self.buckets:
            bucket.wait()

    def reset(self) -> None:
        """Wait, then make every bucket launchable again (a new step)."""
        for bucket in self.buckets:
            bucket.reset()
        self.next_launch = 0


def _weak_hook(method: weakref.WeakMethod):
    """A grad hook calling ``method`` while its object lives, and nothing once it is gone."""
    def hook(param: torch.Tensor) -> None:
        bound = method()
        if bound is not None:
            bound(param)
    return hook


class DistributedDataParallel(nn.Module):
    """Wrap a model chunk: fp32 ``main_grad`` buffers and bucketed, overlapped DP reduction.

    Usage per step: ``zero_grad_buffer()`` (the optimizer's ``zero_grad`` does it), then every
    micro-batch but the last under ``with ddp.no_sync():``, the last one outside it, then
    :meth:`finish_grad_sync`. See the module docstring for the communication pattern.

    Args:
        module: the model chunk (parameters may carry ``is_expert`` / ``sequence_parallel``).
        groups: this rank's process groups.
        bucket_size_mb: target bucket size in MB of gradient buffer.
        grad_reduce_in_fp32: fp32 buffers for half models (Megatron's default); otherwise the
            buffers have the parameters' dtype.
        use_distributed_optimizer: ZeRO-1 layout (padded buckets, reduce-scatter, parameter
            buffer); must match the optimizer.
        overlap_grad_reduce: launch full buckets from the backward hooks; otherwise everything
            is launched in :meth:`finish_grad_sync`.
        shard_alignment: ZeRO-1 only: every rank's slice of a bucket is a multiple of this
            many elements (padding); 1 packs tightly (tiny test models).
    """

    def __init__(self, module: nn.Module, groups: ProcessGroups, bucket_size_mb: float = 25.0,
                 grad_reduce_in_fp32: bool = True, use_distributed_optimizer: bool = False,
                 overlap_grad_reduce: bool = True, shard_alignment: int = 64):
        super().__init__()
        if bucket_size_mb <= 0:
            raise ValueError(f"grad bucket size must be positive, got {bucket_size_mb} MB")
        if shard_alignment < 1:
            raise ValueError(f"shard alignment must be at least 1, got {shard_alignment}")
        self.module = module
        self.groups = groups
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_grad_reduce = overlap_grad_reduce
        # Counters since construction: bucket launches and collectives actually issued.
        self.stats = {"bucket_launches": 0, "collectives": 0}
        self._sync_enabled = True

        by_kind: dict = {}
        for p in reversed([p for p in module.parameters() if p.requires_grad]):
            sp = bool(getattr(p, "sequence_parallel", False)) and groups.tp_size > 1
            key = (bool(getattr(p, "is_expert", False)), sp, str(p.dtype))
            by_kind.setdefault(key, []).append(p)
        self.buffers: list[GradBuffer] = []
        for (is_expert, sp, _), params in sorted(by_kind.items()):
            grad_dtype = torch.float32 if grad_reduce_in_fp32 else params[0].dtype
            bucket_numel = max(1, int(bucket_size_mb * 2 ** 20
                                      / torch.empty((), dtype=grad_dtype).element_size()))
            self.buffers.append(GradBuffer(params, groups, grad_dtype, bucket_numel, is_expert,
                                           sp, use_distributed_optimizer, self.stats,
                                           shard_alignment))
        self._buffer_of = {p: b for b in self.buffers for p in b.params}
        # The hooks hold this wrapper weakly: a bound method would close a cycle (parameter ->
        # autograd hook -> wrapper -> module -> parameter) through C++ objects that Python's
        # garbage collector cannot see, so the wrapper, its buffers and its process groups
        # (with their gloo threads) would outlive every reference and destroy_process_group.
        hook = _weak_hook(weakref.WeakMethod(self._grad_hook))
        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in self._buffer_of]

    def _grad_hook(self, param: torch.Tensor) -> None:
        # Runs in backward right after autograd accumulated into param.grad.
        param.main_grad.add_(param.grad)
        param.grad = None
        if self._sync_enabled:
            buffer = self._buffer_of[param]
            buffer.mark_ready(param, launch=self.overlap_grad_reduce
                              and not buffer.sequence_parallel)

    def forward(self, *args, **kwargs):
        """Run the wrapped module."""
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients without any communication (non-final micro-batches)."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def start_grad_sync(self) -> None:
        """Launch every bucket not launched yet (sequence-parallel ones after a TP all-reduce)."""
        for buffer in self.buffers:
            if buffer.sequence_parallel and buffer.next_launch == 0:
                self.stats["collectives"] += 1
                dist.all_reduce(buffer.grad_data, group=self.groups.tp)
            buffer.launch_remaining()

    def finish_grad_sync(self) -> None:
        """Complete the step's reduction: after it, every ``main_grad`` holds the averaged grad.

        With ZeRO-1 and reduce-scatter only this rank's slice of each bucket is reduced.
        """
        self.start_grad_sync()
        for buffer in self.buffers:
            buffer.wait()
        for buffer in self.buffers:
            buffer.reset()

    def zero_grad_buffer(self) -> None:
        """Zero every ``main_grad`` (and ``param.grad``) and forget this step's bucket state."""
        for buffer in self.buffers:
            buffer.reset()
            buffer.grad_data.zero_()
        for p in self._buffer_of:
            p.grad = None

    @torch.no_grad()
    def broadcast_params(self) -> None:
        """Make replicas identical: dense params from DP rank 0, experts from expert-DP rank 0."""
        for buffer in self.buffers:
            if buffer.group is None:
                continue
            src = dist.get_global_rank(buffer.group, 0)
            for p in buffer.params:
                dist.broadcast(p.data, src=src, group=buffer.group)

    def state_dict(self, *args, **kwargs):
        """The wrapped module's state dict (no ``module.`` prefix in checkpoints)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        """Load into the wrapped module (parameters stay views of the ZeRO-1 buffer)."""
        return self.module.load_state_dict(state_dict, strict=strict, **kwargs)


def _ddp_chunks(model_chunks) -> list:
    chunks = [model_chunks] if isinstance(model_chunks, nn.Module) else list(model_chunks)
    return [c for c in chunks if isinstance(c, DistributedDataParallel)]


@contextlib.contextmanager
def no_sync(model_chunks):
    """``no_sync()`` of every DDP-wrapped chunk at once (plain modules are ignored).

    The pipeline schedules take a factory: ``no_sync=functools.partial(no_sync, chunks)``.
    """
    with contextlib.ExitStack() as stack:
        for chunk in _ddp_chunks(model_chunks):
            stack.enter_context(chunk.no_sync())
        yield


def finish_grad_sync(model_chunks) -> None:
    """:meth:`DistributedDataParallel.finish_grad_sync` of every DDP-wrapped chunk, in order."""
    for chunk in _ddp_chunks(model_chunks):
        chunk.finish_grad_sync()
