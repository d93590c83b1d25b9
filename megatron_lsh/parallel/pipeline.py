"""Pipeline parallelism: stage split, schedules (1F1B, all-forward-all-backward), tied embeddings.

The schedules are model-agnostic. The caller supplies ``forward_step(microbatch, inputs)``
which runs *this stage* on one micro-batch and returns a :class:`StageOutput`:

- ``outputs``: tensors for the next stage (ignored on the last stage),
- ``loss``: a scalar to back-propagate from this stage: the training loss on the last stage,
  and any auxiliary loss produced here (MoE load balancing) on the others; the schedule
  divides it by the number of micro-batches and multiplies by the loss scale,
- ``report``: detached numbers for logging (e.g. ``{'lm loss': ...}``).

Gradient accumulation over micro-batches and data-parallel reduction are connected through
``no_sync``: a context-manager factory entered for every backward but the last, so the bucketed
all-reduce fires only once per step (and can overlap the last backward).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.p2p import PipelineP2P


@dataclass
class StageOutput:
    """What one stage produced for one micro-batch (see the module docstring)."""

    outputs: list = field(default_factory=list)
    loss: Optional[torch.Tensor] = None
    report: dict = field(default_factory=dict)


ForwardStep = Callable[[int, Optional[list]], StageOutput]


def stage_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """The contiguous block of layer indices held by pipeline stage ``pp_rank``."""
    if num_layers % pp_size:
        raise ValueError(f"num-layers ({num_layers}) is not divisible by "
                         f"pipeline-model-parallel-size ({pp_size})")
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


class _GradSyncGate:
    """Holds the no-sync context open for every backward except the last one of the step."""

    def __init__(self, no_sync: Optional[Callable[[], contextlib.AbstractContextManager]]):
        self._stack = contextlib.ExitStack()
        if no_sync is not None:
            self._stack.enter_context(no_sync())

    def open_for_last_backward(self) -> None:
        self._stack.close()


def _scale_of(loss_scale: Union[float, Callable[[], float]]) -> float:
    return float(loss_scale() if callable(loss_scale) else loss_scale)


class _Runner:
    """Runs forward and backward of single micro-batches on this stage."""

    def __init__(self, forward_step: ForwardStep, num_microbatches: int, loss_scale,
                 reports: list):
        self.forward_step = forward_step
        self.num_microbatches = num_microbatches
        self.scale = _scale_of(loss_scale) / num_microbatches
        self.reports = reports

    def forward(self, microbatch: int, inputs: Optional[list]) -> StageOutput:
        if inputs is not None:
            for t in inputs:
                t.requires_grad_(t.is_floating_point())
        out = self.forward_step(microbatch, inputs)
        if not isinstance(out, StageOutput):
            raise TypeError("forward_step must return a StageOutput")
        if out.report:
            self.reports.append(out.report)
        return out

    def backward(self, inputs: Optional[list], out: StageOutput,
                 output_grads: Optional[list]) -> Optional[list]:
        tensors, grads = [], []
        if output_grads is not None:
            for t, g in zip(out.outputs, output_grads):
                if t.requires_grad:
                    tensors.append(t)
                    grads.append(g.to(t.dtype))
        if out.loss is not None and out.loss.requires_grad:
            tensors.append(out.loss * self.scale)
            grads.append(None)
        if tensors:
            torch.autograd.backward(tensors, grads)
        if inputs is None:
            return None
        return [t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs]


def forward_backward_no_pipelining(forward_step: ForwardStep, num_microbatches: int, *,
                                   forward_only: bool = False, no_sync=None,
                                   loss_scale=1.0) -> list[dict]:
    """One stage: forward+backward each micro-batch in turn; returns the reports."""
    reports: list[dict] = []
    runner = _Runner(forward_step, num_microbatches, loss_scale, reports)
    gate = _GradSyncGate(None if forward_only else no_sync)
    for mb in range(num_microbatches):
        if forward_only:
            with torch.no_grad():
                runner.forward(mb, None)
            continue
        out = runner.forward(mb, None)
        if mb == num_microbatches - 1:
            gate.open_for_last_backward()
        runner.backward(None, out, None)
    gate.open_for_last_backward()
    return reports


def forward_backward_pipelining(forward_step: ForwardStep, num_microbatches: int,
                                groups: ProcessGroups, p2p: PipelineP2P, *,
                                schedule: str = "1f1b", forward_only: bool = False,
                                no_sync=None, loss_scale=1.0) -> list[dict]:
    """Run one step of ``num_microbatches`` through this rank's pipeline stage.

    ``1f1b``: stage ``i`` of ``p`` runs ``p - i - 1`` warm-up forwards, then alternates one
    forward with one backward, then drains the remaining backwards; at most ``p - i``
    micro-batches' activations are alive at once. ``afab``: all forwards, then all backwards
    (simplest; memory grows with the micro-batch count). Both give identical gradients.
    Returns the reports of the micro-batches run here (the last stage's hold the losses).
    """
    if schedule not in ("1f1b", "afab"):
        raise ValueError(f"pipeline schedule must be '1f1b' or 'afab', got {schedule!r}")
    reports: list[dict] = []
    runner = _Runner(forward_step, num_microbatches, loss_scale, reports)
    grad_ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    gate = _GradSyncGate(None if forward_only else no_sync)
    in_flight: list[tuple] = []

    def forward(mb: int, inputs):
        with grad_ctx:
            out = runner.forward(mb, inputs)
        if not forward_only:
            in_flight.append((inputs, out))
        return out

    def backward(output_grads, backwards_done: int):
        inputs, out = in_flight.pop(0)
        if backwards_done == num_microbatches - 1:
            gate.open_for_last_backward()
        return runner.backward(inputs, out, output_grads)

    if schedule == "afab" or forward_only:
        for mb in range(num_microbatches):
            out = forward(mb, p2p.recv_forward())
            p2p.send_forward(out.outputs)
        if not forward_only:
            for mb in range(num_microbatches):
                p2p.send_backward(backward(p2p.recv_backward(), mb))
        gate.open_for_last_backward()
        return reports

    warmup = min(groups.pp_size - groups.pp_rank - 1, num_microbatches)
    steady = num_microbatches - warmup
    for mb in range(warmup):
        out = forward(mb, p2p.recv_forward())
        p2p.send_forward(out.outputs)
    inputs = p2p.recv_forward() if steady > 0 else None
    done = 0
    for i in range(steady):
        out = forward(warmup + i, inputs)
        output_grads = p2p.send_forward_recv_backward(out.outputs)
        input_grads = backward(output_grads, done)
        done += 1
        if i == steady - 1:
            p2p.send_backward(input_grads)
        else:
            inputs = p2p.send_backward_recv_forward(input_grads)
    for _ in range(warmup):
        input_grads = backward(p2p.recv_backward(), done)
        done += 1
        p2p.send_backward(input_grads)
    gate.open_for_last_backward()
    return reports


def forward_backward(forward_step: ForwardStep, num_microbatches: int, groups: ProcessGroups,
                     p2p: Optional[PipelineP2P] = None, **kwargs) -> list[dict]:
    """Dispatch to the pipelined schedule when pp > 1, else to the plain loop."""
    if groups.pp_size == 1:
        kwargs.pop("schedule", None)
        return forward_backward_no_pipelining(forward_step, num_microbatches, **kwargs)
    if p2p is None:
        raise ValueError("a PipelineP2P is needed when pipeline-model-parallel-size > 1")
    return forward_backward_pipelining(forward_step, num_microbatches, groups, p2p, **kwargs)


def _grad_of(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad


def shared_embedding_params(params: Sequence[torch.nn.Parameter]) -> list:
    """The parameters marked ``shared_embedding`` (word embeddings tied across stages)."""
    return [p for p in params if getattr(p, "shared_embedding", False)]


def sync_tied_embedding_weights(params: Sequence[torch.nn.Parameter], groups: ProcessGroups) -> None:
    """Make the last stage's output-layer copy equal the first stage's embedding (at init)."""
    if groups.embedding is None:
        return
    for p in shared_embedding_params(params):
        with torch.no_grad():
            dist.broadcast(p.data, src=groups.embedding_ranks[0], group=groups.embedding)


def allreduce_tied_embedding_grads(params: Sequence[torch.nn.Parameter],
                                   groups: ProcessGroups) -> None:
    """Sum the gradients of the tied word embedding over the first and last stage."""
    if groups.embedding is None:
        return
    for p in shared_embedding_params(params):
        grad = _grad_of(p)
        if grad is None:
            grad = torch.zeros_like(p)
            p.grad = grad
        dist.all_reduce(grad, group=groups.embedding)
