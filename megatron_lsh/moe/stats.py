"""Per-layer, per-iteration statistics of the MoE dispatch, and the optional stage timer.

:class:`MoEStats` holds plain Python numbers taken from host-side values the dispatch needs
anyway (split sizes), so collecting them costs no device synchronisation. The one exception,
the mean cosine similarity of rows to their centroids, is kept as a 0-dim tensor and turned
into a float only when read (``stats.mean_cosine``), so the sync happens in the logger.

Bytes are counted per rank and per forward, in two flavours:

* ``bytes_fwd`` / ``bytes_bwd``: what this rank sends to *other* ranks (the network traffic);
* ``bytes_fwd_total`` / ``bytes_bwd_total``: the same including the chunk it sends to itself.

Forward = split-size exchange (int64 counts) + dispatch all-to-all (payload rows) + combine
all-to-all (expert outputs going back). Backward = the two gradient all-to-alls, which move
exactly the same rows in the opposite directions (no split exchange: the splits are reused).
With LSH the payload rows are centroids; with ``cast`` rows are counted at their wire size.

Stage "hash" is the codes from the projections ``x @ R_all``; the projections themselves are
extra columns of the router's matmul (a few more outputs of a pass over the tokens the router
makes anyway), so they are counted in neither stage.

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

FORWARD_STAGES = ("permute", "hash", "cluster", "a2a", "experts", "restore", "unpermute")
BACKWARD_STAGES = ("compress_bwd", "a2a_bwd", "experts_bwd", "restore_bwd")
OVERHEAD_STAGES = ("hash", "cluster", "restore", "compress_bwd", "restore_bwd")


@dataclass
class MoEStats:
    """What one MoE layer's dispatch did on this rank in its latest forward."""

    tokens: int = 0
    """Tokens this rank dispatched (after the TP split)."""
    rows: int = 0
    """(token, expert) rows kept by the router."""
    dropped_rows: int = 0
    """Rows dropped by the capacity factor."""
    centroids: int = 0
    """Rows actually sent (equal to ``rows`` without LSH)."""
    compression_rate: float = 1.0
    """centroids / rows (the paper's 'compression rate': lower is more compression)."""
    bytes_fwd: int = 0
    bytes_bwd: int = 0
    bytes_fwd_total: int = 0
    bytes_bwd_total: int = 0
    ms: dict = field(default_factory=dict)
    """Wall-clock ms per stage (forward: FORWARD_STAGES; backward: BACKWARD_STAGES); timing only."""
    cpu_ms: dict = field(default_factory=dict)
    """The same in CPU time of the calling thread (what the stage cost, without preemption)."""
    _cosine: Optional[torch.Tensor] = None

    @property
    def mean_cosine(self) -> float:
        """Mean cosine of rows to their centroids (1.0 without LSH); reading it syncs."""
        return 1.0 if self._cosine is None else float(self._cosine)

    @property
    def overhead_ms(self) -> float:
        """Time spent in LSH bookkeeping: hashing, clustering and restore, forward + backward."""
        return sum(self.ms.get(k, 0.0) for k in OVERHEAD_STAGES)

    @property
    def overhead_cpu_ms(self) -> float:
        """``overhead_ms`` in CPU time of the calling thread."""
        return sum(self.cpu_ms.get(k, 0.0) for k in OVERHEAD_STAGES)

    def as_dict(self) -> dict:
        """Plain numbers for logs (reads the cosine)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out["ms"], out["cpu_ms"] = dict(self.ms), dict(self.cpu_ms)
        out["mean_cosine"] = self.mean_cosine
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

    def _now(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.thread_time()

    @staticmethod
    def _charge(stats: MoEStats, stage: str, start, end) -> None:
        stats.ms[stage] = stats.ms.get(stage, 0.0) + 1e3 * (end[0] - start[0])
        stats.cpu_ms[stage] = stats.cpu_ms.get(stage, 0.0) + 1e3 * (end[1] - start[1])

    def start(self, stats: MoEStats) -> None:
        """Begin timing a forward that fills ``stats``."""
        self.stats = stats
        if self.enabled:
            self._t = self._now()

    def lap(self, stage: str) -> None:
        """Charge the time since the previous lap to forward ``stage``."""
        if self.enabled:
            now = self._now()
            self._charge(self.stats, stage, self._t, now)
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
        now = self._now()
        key = (id(stats), stage)
        if edge == "out":
            self._bwd_open[key] = now
        elif key in self._bwd_open:
            self._charge(stats, stage, self._bwd_open.pop(key), now)
