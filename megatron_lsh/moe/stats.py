"""Per-layer, per-iteration statistics of the MoE dispatch, and the optional stage timer.

:class:`MoEStats` holds plain Python numbers taken from host-side values the dispatch needs
anyway (split sizes), so collecting them costs no device synchronisation. The compressor adds
its own statistics in ``extra`` (e.g. LSH's mean cosine of rows to their centroids), kept as
0-dim tensors and turned into floats only when read (``as_dict``, ``mean_cosine``), so the
sync happens in the logger.

Bytes are counted per rank and per forward, in two flavours:

* ``bytes_fwd`` / ``bytes_bwd``: what this rank sends to *other* ranks (the network traffic);
* ``bytes_fwd_total`` / ``bytes_bwd_total``: the same including the chunk it sends to itself.

Forward = split-size exchange (int64 counts) + dispatch all-to-all (payload rows) + combine
all-to-all (expert outputs going back). Backward = the two gradient all-to-alls, which move
exactly the same rows in the opposite directions (no split exchange: the splits are reused).
The payload rows are whatever the compressor sends (LSH: centroids); with a wire codec
(``cast``) rows are counted at their wire size.

Stage names: the dispatcher times ``permute``, ``a2a``, ``experts`` and ``unpermute`` (and
``a2a_bwd``, ``experts_bwd`` in the backward); a compressor adds its own and lists those that
are its overhead in ``overhead_stages`` (copied here per forward). Columns a compressor asks
the router to compute (``router_columns``) are part of the router's matmul: the layer times
the router as ``route`` and charges the extra columns' share of its matmul
(``Q / (E + Q)`` of the ``route`` time, the share of the multiply-adds) to ``project``,
which such a compressor counts as overhead.

Timing (``StageTimer``, off by default) records forward stage times with ``perf_counter``
(and the calling thread's CPU time, which on an oversubscribed machine measures what a stage
costs without the time the thread waited for a core) and backward stage times with identity
autograd markers placed around each stage; on CUDA it synchronises the device at every mark,
which is why it is opt-in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Optional

import torch



@dataclass
class MoEStats:
    """What one MoE layer's dispatch did on this rank in its latest forward."""

    tokens: int = 0
    """Tokens this rank dispatched (after the TP split)."""
    rows: int = 0
    """(token, expert) rows kept by the router."""
    dropped_rows: int = 0
    """Rows dropped by the capacity factor."""
    sent_rows: int = 0
    """Payload rows actually sent (equal to ``rows`` for ``none``; LSH: centroids)."""
    compression_rate: float = 1.0
    """sent_rows / rows (the paper's 'compression rate': lower is more compression)."""
    bytes_fwd: int = 0
    bytes_bwd: int = 0
    tp_bytes: int = 0
    """Of ``bytes_fwd`` (and of ``bytes_bwd``): the TP all-gather of a TP-shared payload."""
    bytes_fwd_total: int = 0
    bytes_bwd_total: int = 0
    ms: dict = field(default_factory=dict)
    """Wall-clock ms per stage (forward and ``*_bwd`` backward stages); timing only."""
    cpu_ms: dict = field(default_factory=dict)
    """The same in CPU time of the calling thread (what the stage cost, without preemption)."""
    extra: dict = field(default_factory=dict)
    """The compressor's own statistics (name -> number or 0-dim tensor)."""
    overhead_stages: tuple = ()
    """The compressor's stage names that count as its overhead."""

    @property
    def mean_cosine(self) -> float:
        """Mean cosine of rows to what was sent for them (1.0 when exact); reading it syncs."""
        value = self.extra.get("mean_cosine")
        return 1.0 if value is None else float(value)

    @property
    def overhead_ms(self) -> float:
        """Time spent in the compressor's own work, forward + backward."""
        return sum(self.ms.get(k, 0.0) for k in self.overhead_stages)

    @property
    def overhead_cpu_ms(self) -> float:
        """``overhead_ms`` in CPU time of the calling thread."""
        return sum(self.cpu_ms.get(k, 0.0) for k in self.overhead_stages)

    def as_dict(self) -> dict:
        """Plain numbers for logs (reads the compressor's statistics)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("extra", "overhead_stages")}
        out["ms"], out["cpu_ms"] = dict(self.ms), dict(self.cpu_ms)
        out["mean_cosine"] = self.mean_cosine
        out.update({k: float(v) for k, v in self.extra.items()})
        return out


class _BackwardMark(torch.autograd.Function):
    """Identity whose backward records the time under ``name`` (start or end of a stage)."""

    @staticmethod
    def forward(ctx, x, timer, name):
        ctx.timer, ctx.name = timer, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.timer.stamp_backward(ctx.name)
        return grad, None, None


class StageTimer:
    """Forward stage timing by ``perf_counter``; backward timing through autograd markers.

    Disabled (the default) it does nothing and ``mark`` returns its input unchanged.
    """

    def __init__(self, enabled: bool, device: Optional[torch.device] = None):
        self.enabled = enabled
        self.cuda = device is not None and device.type == "cuda"
        self.stats: Optional[MoEStats] = None
        self._t = 0.0
        self._bwd_open: dict = {}

    def charge(self, stats: "MoEStats", stage: str, start, end, share: float = 1.0) -> None:
        """Charge ``share`` of the interval ``start..end`` (from :meth:`now`) to ``stage``."""
        stats.ms[stage] = stats.ms.get(stage, 0.0) + share * 1e3 * (end[0] - start[0])
        stats.cpu_ms[stage] = stats.cpu_ms.get(stage, 0.0) + share * 1e3 * (end[1] - start[1])

    def now(self) -> tuple[float, float]:
        """(wall, thread CPU) seconds now, after a device sync on CUDA."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.thread_time()

    def start(self, stats: MoEStats) -> None:
        """Begin timing a forward that fills ``stats``."""
        self.stats = stats
        if self.enabled:
            self._t = self.now()

    def lap(self, stage: str) -> None:
        """Charge the time since the previous lap to forward ``stage``."""
        if self.enabled:
            now = self.now()
            self.charge(self.stats, stage, self._t, now)
            self._t = now

    def mark(self, x: torch.Tensor, stage: str, edge: str) -> torch.Tensor:
        """Place a backward marker on ``x``; ``edge`` is 'in' (stage input) or 'out' (output).

        In backward the 'out' marker fires when the stage's gradient work starts and the 'in'
        marker when it has finished; the difference is charged to ``stage``.
        """
        if not self.enabled or not x.requires_grad:
            return x
        return _BackwardMark.apply(x, self, (self.stats, stage, edge))

    def stamp_backward(self, name) -> None:
        """Called by a backward marker: open or close the backward interval of a stage."""
        stats, stage, edge = name
        now = self.now()
        key = (id(stats), stage)
        if edge == "out":
            self._bwd_open[key] = now
        elif key in self._bwd_open:
            self.charge(stats, stage, self._bwd_open.pop(key), now)
