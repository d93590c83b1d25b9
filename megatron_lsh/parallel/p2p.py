"""Point-to-point exchange of activations and gradients between adjacent pipeline stages.

A message is a list of tensors of one dtype with shapes unknown to the receiver (a T5 decoder
stage receives its hidden states *and* the encoder output; MoE layers never change shapes but
nothing here relies on it). Each message is therefore sent as:

1. a one-element int64 header length,
2. the header ``[n, ndim_0, *shape_0, ndim_1, *shape_1, ...]``,
3. the n tensors.

Deadlock freedom: every exchange first *posts all its sends* (``isend``) and only then
receives (blocking), so two neighbours that send to each other at the same time (the 1F1B
steady state: "send my activation, receive your gradient") never wait on each other.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_lsh.parallel.dims import ProcessGroups


def _header(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    values = [len(tensors)]
    for t in tensors:
        values.append(t.dim())
        values.extend(t.shape)
    return torch.tensor(values, dtype=torch.int64)


class PipelineP2P:
    """Sends/receives tensor lists to/from the previous and next stage of this rank's pipeline.

    Uses global ranks from ``groups.pp_ranks`` over the default group. ``device`` is where
    received tensors are placed (CUDA for NCCL, CPU for gloo).
    """

    def __init__(self, groups: ProcessGroups, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        self.groups = groups
        self.dtype = dtype
        self.device = device or torch.device("cpu")
        stage = groups.pp_rank
        ranks = groups.pp_ranks
        self.prev_rank = ranks[stage - 1] if stage > 0 else None
        self.next_rank = ranks[stage + 1] if stage + 1 < len(ranks) else None

    # -- low level -------------------------------------------------------------------------
    def _post_send(self, tensors: Sequence[torch.Tensor], dst: int) -> list:
        header = _header(tensors).to(self.device)
        length = torch.tensor([header.numel()], dtype=torch.int64, device=self.device)
        works = [dist.isend(length, dst), dist.isend(header, dst)]
        # Keep references: the buffers must live until the sends complete.
        self._pending_buffers = getattr(self, "_pending_buffers", []) + [length, header]
        for t in tensors:
            t = t.detach().to(self.dtype).contiguous()
            self._pending_buffers.append(t)
            works.append(dist.isend(t, dst))
        return works

    def _recv(self, src: int) -> list[torch.Tensor]:
        length = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.recv(length, src)
        header = torch.empty(int(length.item()), dtype=torch.int64, device=self.device)
        dist.recv(header, src)
        values = header.tolist()
        count, pos, out = values[0], 1, []
        for _ in range(count):
            ndim = values[pos]
            shape = values[pos + 1: pos + 1 + ndim]
            pos += 1 + ndim
            t = torch.empty(shape, dtype=self.dtype, device=self.device)
            dist.recv(t, src)
            out.append(t)
        return out

    def _exchange(self, send: Optional[Sequence[torch.Tensor]], dst: Optional[int],
                  src: Optional[int]) -> Optional[list[torch.Tensor]]:
        works = self._post_send(send, dst) if (send is not None and dst is not None) else []
        received = self._recv(src) if src is not None else None
        for w in works:
            w.wait()
        self._pending_buffers = []
        return received

    # -- the four directions and their combinations (names as in Megatron) -----------------
    def recv_forward(self) -> Optional[list[torch.Tensor]]:
        """Activations from the previous stage (None on the first stage)."""
        return self._exchange(None, None, self.prev_rank)

    def send_forward(self, tensors: Optional[Sequence[torch.Tensor]]) -> None:
        """Activations to the next stage (no-op on the last stage)."""
        self._exchange(tensors, self.next_rank, None)

    def recv_backward(self) -> Optional[list[torch.Tensor]]:
        """Gradients from the next stage (None on the last stage)."""
        return self._exchange(None, None, self.next_rank)

    def send_backward(self, grads: Optional[Sequence[torch.Tensor]]) -> None:
        """Gradients to the previous stage (no-op on the first stage)."""
        self._exchange(grads, self.prev_rank, None)

    def send_forward_recv_backward(self, tensors) -> Optional[list[torch.Tensor]]:
        """1F1B steady state: ship an activation forward, get a gradient back."""
        return self._exchange(tensors, self.next_rank, self.next_rank)

    def send_backward_recv_forward(self, grads) -> Optional[list[torch.Tensor]]:
        """1F1B steady state: ship a gradient back, get the next activation."""
        return self._exchange(grads, self.prev_rank, self.prev_rank)
