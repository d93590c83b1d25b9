"""Run a function on N local processes with torch.distributed initialised (tests, benchmarks).

Each worker gets ``fn(rank, world_size, *args)`` with a gloo (or given) process group already
set up through a fresh ``FileStore`` (no port to race for). Results come back through files,
so large tensors never block a pipe. A deadline turns a broken collective into an error
instead of a hang: if any rank fails or time runs out, the rest are killed and the first
traceback is raised in the parent.

A worker also fails when process groups outlive ``destroy_process_group`` (their gloo threads
still run after ``fn`` returned): such groups are torn down during interpreter shutdown, where
gloo can abort the process ("terminate called without an active exception") after it reported
success. Checking here turns that rare, timing-dependent abort into a deterministic error.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_lsh.parallel.dims import init_process_group, lingering_gloo_threads


class WorkerError(RuntimeError):
    """A worker process raised, crashed or did not finish in time."""


def _worker(fn: Callable, rank: int, world_size: int, args: tuple, workdir: str,
            backend: str, env: dict, threads: int) -> None:
    os.environ.update(env)
    torch.set_num_threads(threads)
    out_path = os.path.join(workdir, f"result_{rank}.pkl")

    def write(payload):
        tmp = out_path + ".tmp"
        with open(tmp, "wb") as f:
            torch.save(payload, f) if payload[0] == "ok" else pickle.dump(payload, f)
        os.replace(tmp, out_path)

    try:
        store = dist.FileStore(os.path.join(workdir, "store"), world_size)
        init_process_group(backend, store=store, rank=rank, world_size=world_size,
                           timeout=timedelta(seconds=float(env.get("SPAWN_PG_TIMEOUT", 300))))
        result = fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        # Written before tearing down the group, so the parent can tell who failed first.
        write(("error", traceback.format_exc()))
        os._exit(1)
    dist.destroy_process_group()
    leaked = lingering_gloo_threads()
    if leaked:
        write(("error", f"{len(leaked)} gloo threads ({', '.join(sorted(set(leaked)))}) still "
                        f"run after destroy_process_group: something keeps a process group "
                        f"alive (a reference cycle through autograd hooks, a cache keyed by "
                        f"group, an unwaited work handle)"))
        os._exit(1)
    write(("ok", result))


def _load(path: str):
    try:
        return torch.load(path, weights_only=False)
    except Exception:  # written with pickle (error payloads)
        with open(path, "rb") as f:
            return pickle.load(f)


def run_distributed(fn: Callable, world_size: int, *args: Any, backend: str = "gloo",
                    timeout: float = 300.0, threads: int = 1,
                    env: Optional[dict] = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results.

    ``fn`` must be importable (a module-level function). Raises :class:`WorkerError` with the
    failing rank's traceback, or with the ranks still running when ``timeout`` seconds pass.
    """
    ctx = mp.get_context("spawn")
    env = {k: str(v) for k, v in (env or {}).items()}
    env.setdefault("SPAWN_PG_TIMEOUT", str(int(timeout)))
    with tempfile.TemporaryDirectory(prefix="mlsh_spawn_") as workdir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, args, workdir, backend,
                                                   env, threads), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failure = None
        while True:
            alive = [r for r, p in enumerate(procs) if p.is_alive()]
            failed = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode != 0]
            if failed:
                # Report the rank that failed first: the others often fail only because it left.
                def when(r):
                    path = os.path.join(workdir, f"result_{r}.pkl")
                    return os.path.getmtime(path) if os.path.exists(path) else float("inf")
                r = min(failed, key=when)
                path = os.path.join(workdir, f"result_{r}.pkl")
                detail = _load(path)[1] if os.path.exists(path) else f"exit code {procs[r].exitcode}"
                failure = f"rank {r} of {world_size} failed:\n{detail}"
                break
            if not alive:
                break
            if time.monotonic() > deadline:
                failure = f"ranks {alive} of {world_size} did not finish within {timeout:.0f} s"
                break
            time.sleep(0.05)
        if failure is not None:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
            raise WorkerError(failure)
        for p in procs:
            p.join()
        return [_load(os.path.join(workdir, f"result_{r}.pkl"))[1] for r in range(world_size)]
