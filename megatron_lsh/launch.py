"""``python -m megatron_lsh.launch TORCHRUN_ARGS...``: torchrun whose job ends cleanly on SIGTERM.

A scheduler that pre-empts a job sends SIGTERM (Slurm to every process of the step, a person
with ``kill`` to the launcher). torchrun answers a SIGTERM to itself by killing its workers
and exiting 1 with a traceback, even when the workers, run with ``--exit-signal-handler``,
would have saved a checkpoint and exited 0; a scheduler reads that as a failed job.

This wrapper runs torchrun with the same arguments in a session of its own (so a signal to the
wrapper's process group does not reach torchrun) and, on SIGTERM or SIGINT, forwards SIGTERM to
torchrun's workers only. They finish their iteration, save, and exit 0; torchrun then sees a
successful job and exits 0, and so does the wrapper (it exits with torchrun's status). A
second signal, or one that arrives before any worker runs, terminates torchrun itself. Linux
only (workers are found through ``/proc``).

    python -m megatron_lsh.launch --standalone --nproc-per-node 4 pretrain_gpt_moe.py \\
        --exit-signal-handler --save ckpt --load ckpt ...
"""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
from typing import List, Optional, Sequence


def child_pids(pid: int) -> List[int]:
    """The direct children of process ``pid`` (empty when it is gone)."""
    children: List[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                children += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return sorted(set(children))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run torchrun with ``argv``; returns its exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv],
                            start_new_session=True)
    signals = {"count": 0}

    def forward(signum, frame):
        signals["count"] += 1
        workers = child_pids(proc.pid)
        if signals["count"] == 1 and workers:
            print(f"> launch: signal {signum}: asking the {len(workers)} workers to save and "
                  f"exit", file=sys.stderr, flush=True)
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        else:
            proc.terminate()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    while True:
        try:
            return proc.wait()
        except InterruptedError:   # pragma: no cover - wait is retried by Python itself
            continue


if __name__ == "__main__":
    sys.exit(main())
