"""Stopping cleanly on SIGTERM (``--exit-signal-handler``) or at ``--exit-duration-in-mins``.

Clusters send SIGTERM some time before they kill a job. The handler only records that the
signal arrived; at the end of each iteration the loop asks
:meth:`DistributedSignalHandler.any_received`, an all-reduce, so that every rank sees the same
answer at the same iteration even if the signal reached only some of them, then saves a
checkpoint and exits with status 0::

    with DistributedSignalHandler() as handler:   # or keep one handler for the whole run
        for iteration in ...:
            train_step()
            if handler.any_received():
                save_checkpoint(...); break

:class:`ExitDurationTimer` does the same for a wall-clock budget (Megatron measures it from the
start of the program). Both are collective: every rank must call them at the same point.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, group: Optional[dist.ProcessGroup] = None) -> bool:
    """True when ``flag`` holds on at least one rank of ``group`` (world by default).

    Without torch.distributed (a one-process run) this is ``flag``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


class DistributedSignalHandler:
    """Records a signal (SIGTERM by default) instead of dying; the ranks agree on it.

    Constructing it installs the handler (as Megatron's ``get_signal_handler`` does);
    :meth:`release`, or leaving a ``with`` block, restores the previous one. Must be created in
    the main thread (Python delivers signals there).
    """

    def __init__(self, sig: int = signal.SIGTERM, group: Optional[dist.ProcessGroup] = None, *,
                 install: bool = True):
        self.sig, self.group = sig, group
        self._received = False
        self._previous = None
        self._installed = False
        if install:
            self.install()

    @property
    def received(self) -> bool:
        """Whether the signal reached this rank (no communication)."""
        return self._received

    def _handle(self, signum, frame) -> None:
        self._received = True

    def install(self) -> None:
        """Start recording the signal (idempotent)."""
        if self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(f"the {signal.Signals(self.sig).name} handler must be installed "
                               f"from the main thread, not {threading.current_thread().name}")
        self._previous = signal.getsignal(self.sig)
        signal.signal(self.sig, self._handle)
        self._installed = True

    def __enter__(self) -> "DistributedSignalHandler":
        self.install()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> bool:
        """Restore the previous handler; False if it was already restored."""
        if not self._installed:
            return False
        signal.signal(self.sig, self._previous)
        self._installed = False
        return True

    def any_received(self) -> bool:
        """True on every rank once any rank got the signal (collective)."""
        return any_rank(self._received, self.group)

    def signals_received(self) -> list[bool]:
        """Per-rank flags (Megatron's interface; collective). Prefer :meth:`any_received`."""
        if not (dist.is_available() and dist.is_initialized()):
            return [self._received]
        world = dist.get_world_size(self.group)
        mine = torch.tensor([1 if self._received else 0], dtype=torch.int32, device=_device())
        flags = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(flags, mine, group=self.group)
        return [bool(f.item()) for f in flags]


class ExitDurationTimer:
    """Has ``duration_mins`` of wall-clock time passed since ``start_time``? Ranks agree.

    ``start_time`` (``time.time()``) defaults to now; entry points pass the time the program
    started, as Megatron does. ``duration_mins=None`` never expires.
    """

    def __init__(self, duration_mins: Optional[float], start_time: Optional[float] = None,
                 group: Optional[dist.ProcessGroup] = None):
        if duration_mins is not None and duration_mins <= 0:
            raise ValueError(f"exit-duration-in-mins must be positive, got {duration_mins}")
        self.duration_mins, self.group = duration_mins, group
        self.start_time = time.time() if start_time is None else start_time

    def elapsed_minutes(self) -> float:
        """Minutes since ``start_time``."""
        return (time.time() - self.start_time) / 60.0

    def expired(self) -> bool:
        """True on every rank once any rank's clock passed the limit (collective when enabled)."""
        if self.duration_mins is None:
            return False
        return any_rank(self.elapsed_minutes() > self.duration_mins, self.group)
