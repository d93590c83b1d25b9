"""Turning a stuck or broken collective into one sentence that names who did not answer.

When a rank hangs (a stopped process, a dead GPU, a network partition) its peers block in the
next collective until the backend's timeout (``--distributed-timeout-minutes``, fractions
allowed) and then get a backend error such as gloo's ``Timed out waiting 60000ms for recv
operation``, which names neither the collective nor the missing rank.

:class:`CollectiveWatchdog` keeps a heartbeat per rank in the job's key-value store (the one
``torch.distributed`` rendezvoused with): entering a phase of the step ("forward-backward",
"gradient all-reduce", ...) writes ``sequence number | iteration | phase``, a few bytes per
phase. All ranks pass the same phases in the same order, so when a collective fails, the ranks
whose heartbeat is behind this rank's are the ones that never reached it::

    the gradient all-reduce of iteration 12 timed out after 30 s: rank 1 did not reach it
    (last seen in forward-backward of iteration 12)

:func:`launched_with_parent_death_signal` makes a rank die with its launcher (Linux
``PR_SET_PDEATHSIG``), so no rank outlives a killed ``torchrun``.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
from datetime import timedelta
from typing import Iterator, Optional

import torch.distributed as dist

_KEY = "megatron_lsh/heartbeat/{rank}"
_BACKEND_FAILURE = re.compile(r"timed out|timeout|connection (closed|reset)|broken pipe|"
                              r"connection refused|peer", re.IGNORECASE)
_PR_SET_PDEATHSIG = 1
_SOURCE_TAG = re.compile(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*")   # "[.../pair.cc:537] "


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` looks like a collective that timed out or lost a peer."""
    return isinstance(error, (RuntimeError, dist.DistBackendError)) and bool(
        _BACKEND_FAILURE.search(str(error)))


class CollectiveWatchdog:
    """Per-rank heartbeats in the store; :meth:`explain` names the ranks a failure waited for.

    A no-op in a one-process run or when the store is unavailable.
    """

    def __init__(self, timeout_minutes: float):
        self.timeout_s = timeout_minutes * 60.0
        self.sequence = 0
        self.current = ("setup", 0)
        self.store = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except (RuntimeError, AttributeError, ValueError):
                self.store = None
        else:
            self.rank, self.world = 0, 1

    @contextlib.contextmanager
    def phase(self, name: str, iteration: int) -> Iterator[None]:
        """Mark this rank as inside ``name`` of ``iteration`` (the next heartbeat)."""
        self.sequence += 1
        self.current = (name, iteration)
        if self.store is not None:
            try:
                self.store.set(_KEY.format(rank=self.rank),
                               f"{self.sequence}|{iteration}|{name}")
            except RuntimeError:
                self.store = None   # the store went away: keep training, explain less
        yield

    def _heartbeats(self) -> dict:
        beats = {}
        if self.store is None:
            return beats
        self.store.set_timeout(timedelta(seconds=5))
        for rank in range(self.world):
            key = _KEY.format(rank=rank)
            try:
                if not self.store.check([key]):
                    continue
                sequence, iteration, name = self.store.get(key).decode().split("|", 2)
                beats[rank] = (int(sequence), int(iteration), name)
            except (RuntimeError, ValueError):
                continue
        return beats

    def explain(self, error: BaseException) -> tuple:
        """(one sentence, the rank that should print it) for a failed collective."""
        name, iteration = self.current
        timed_out = re.search(r"timed out|timeout", str(error), re.IGNORECASE) is not None
        reason = _SOURCE_TAG.sub("", str(error).splitlines()[0] if str(error) else "")
        what = (f"the {name} of iteration {iteration} timed out after {self.timeout_s:g} s"
                if timed_out else f"the {name} of iteration {iteration} lost a peer "
                                  f"({reason.strip()[:160]})")
        beats = self._heartbeats()
        if not beats:
            return f"{what}; the other ranks' progress is unknown", self.rank
        behind = sorted(r for r in range(self.world)
                        if beats.get(r, (0, 0, ""))[0] < self.sequence)
        healthy = [r for r in range(self.world) if r not in behind]
        speaker = healthy[0] if healthy else self.rank
        if not behind:
            return (f"{what}; every rank had entered it, so one stopped inside it (the "
                    f"heartbeats cannot tell which)"), speaker
        seen = "; ".join(f"rank {r} last seen in {beats[r][2]} of iteration {beats[r][1]}"
                         if r in beats else f"rank {r} never reported" for r in behind)
        who = ", ".join(str(r) for r in behind)
        return (f"{what}: rank{'s' if len(behind) > 1 else ''} {who} did not reach it "
                f"({seen})"), speaker


def launched_with_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Under a launcher (torchrun sets ``LOCAL_RANK``), die with it: ``PR_SET_PDEATHSIG``.

    Returns whether it was set (Linux only). If the launcher is already gone, exits at once.
    """
    if "LOCAL_RANK" not in os.environ or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:   # the launcher died before the signal was armed
        os._exit(1)
    return True
