"""Per-iteration MoE statistics of a training step: what each MoE layer sent, and stage timers.

:class:`StepMoEStats` collects, per MoE layer of this rank's stage, the numbers of every
forward of the step (rows routed, rows sent, bytes, router loss, the lossy compressors'
distortion) and reduces them over all ranks into the per-layer records of the log line,
TensorBoard and the metrics JSONL; with ``--timing-log-level`` >= 1 it also adds up the MoE
stage times (all-to-all, experts, compression) into the step's timers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

MOE_STAT_FIELDS = ("rows", "sent_rows", "bytes_fwd", "bytes_bwd", "aux_loss", "present",
                   "mean_cosine", "residual_energy", "residual_variance", "lossy")
"""Summed per MoE layer over micro-batches and ranks; the last four: the distortion of what
a lossy compressor sent (its ``mean_cosine`` / ``residual_energy`` / ``residual_variance``
statistics) and how many forwards reported them."""
STEP_TIMERS = ("forward_backward", "grad_sync", "optimizer", "moe_a2a", "moe_experts",
               "moe_compression")
"""Per-iteration stage timers (``--timing-log-level`` >= 1), ms, mean over ranks:
forward-backward of all micro-batches; the wait for the gradient all-reduce after it (the part
not hidden behind the backward) plus the tied-embedding all-reduce; the optimizer step (incl.
the grad-norm all-reduce); and, inside forward-backward, the MoE all-to-alls (forward and
backward, split-size exchange included), the local experts, and the compressor's own work
(hash, cluster, restore; forward and backward)."""


def world_sum(values: list, device: torch.device) -> list:
    """``values`` summed over every rank (float64; the values themselves without a group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class StepMoEStats:
    """The MoE numbers of one step: ``accumulate`` after every forward, ``reduce`` at its end.

    ``layers``: ``(global MoE index, layer)`` of this stage, for ``num_layers`` MoE layers in
    the whole model; a layer has ``mlp.last_stats`` and ``last_aux_loss``.
    """

    def __init__(self, layers: list, num_layers: int, timing: bool):
        self.layers, self.num_layers, self.timing = layers, num_layers, timing
        self.acc = torch.zeros(num_layers, len(MOE_STAT_FIELDS), dtype=torch.float64)
        self._timed: list = []

    def accumulate(self) -> None:
        """Add the last forward of every MoE layer of this stage."""
        for index, layer in self.layers:
            s = layer.mlp.last_stats
            if s is None:
                continue
            lossy = "residual_energy" in s.extra
            self.acc[index] += torch.tensor([s.rows, s.sent_rows, s.bytes_fwd, s.bytes_bwd,
                                             float(layer.last_aux_loss), 1.0,
                                             s.mean_cosine if lossy else 0.0,
                                             float(s.extra["residual_energy"]) if lossy else 0.0,
                                             float(s.extra["residual_variance"]) if lossy else 0.0,
                                             float(lossy)], dtype=torch.float64)
            if self.timing:
                self._timed.append(s)  # its backward times arrive later

    def reduce(self, device: torch.device) -> list:
        """Per MoE layer over all ranks: compression rate, bytes (summed), mean aux loss, and
        (lossy compressors) the mean cosine, residual energy and residual variance of rows to
        what was sent."""
        if self.num_layers == 0:
            return []
        acc = self.acc
        if dist.is_initialized():
            acc = acc.to(device)
            dist.all_reduce(acc)
        out = []
        for rows, sent, bfwd, bbwd, aux, present, cos, energy, variance, lossy in (
                acc.cpu().tolist()):
            layer = {"compression_rate": sent / rows if rows else 1.0,
                     "bytes_fwd": int(bfwd), "bytes_bwd": int(bbwd),
                     "aux_loss": aux / present if present else 0.0}
            if lossy:
                layer.update(mean_cosine=cos / lossy, residual_energy=energy / lossy,
                             residual_variance=variance / lossy)
            out.append(layer)
        return out

    def timers(self, laps: dict, device: torch.device) -> Optional[dict]:
        """The step's stage times (``STEP_TIMERS``, ms) averaged over all ranks, the MoE ones
        from the layers' timings; ``laps`` holds the loop's own stages."""
        moe = {"moe_a2a": 0.0, "moe_experts": 0.0, "moe_compression": 0.0}
        for s in self._timed:
            moe["moe_a2a"] += s.ms.get("a2a", 0.0) + s.ms.get("a2a_bwd", 0.0)
            moe["moe_experts"] += s.ms.get("experts", 0.0) + s.ms.get("experts_bwd", 0.0)
            moe["moe_compression"] += s.overhead_ms
        self._timed = []
        values = [laps.get(k, moe.get(k, 0.0)) for k in STEP_TIMERS]
        world = dist.get_world_size() if dist.is_initialized() else 1
        return dict(zip(STEP_TIMERS, (v / world for v in world_sum(values, device))))
