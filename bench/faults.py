"""A fault campaign against the real trainer: kill, stop and signal ranks, fill the disk, rot files.

What: tiny GPT-MoE runs (2 gloo ranks, EP=2, a synthetic corpus, a checkpoint every 2
iterations) under injected faults, each case repeated ``--trials`` times with a random moment
of injection. Per case the table gives the trials, how many recovered (the job, relaunched as a
user would, or restarted by ``torchrun --max-restarts``, finishes), iterations lost (the last
iteration reached before the fault minus the one resumed from), checkpoints that fail their
checksums or were loaded although corrupt, runs that hung past their deadline, and the seconds
from the fault until the job stopped.

Why: a long pretraining run must lose at most the work since the last checkpoint, never a
checkpoint, and never train on garbage silently (docs/RELIABILITY.md).

Cases:

* ``sigkill``: SIGKILL one rank at a random moment (forward, all-to-all, optimizer, save), then
  relaunch with ``--load``;
* ``sigkill-restarts``: the same under ``torchrun --max-restarts 2``: no person relaunches;
* ``sigterm-rank`` / ``sigterm-launcher``: SIGTERM to one rank / to torchrun (with
  ``--exit-signal-handler``): the run saves and stops; relaunch resumes;
* ``sigstop``: SIGSTOP one rank: the others must stop within ``--distributed-timeout-minutes``
  (here 0.1, 6 s) naming the rank; relaunch resumes;
* ``full-disk``: ``--save`` on an 8 MiB tmpfs (root only; one 5 MiB checkpoint fits): the
  save that does not fit must be refused in one sentence, the previous one stays loadable;
* ``bitflip`` / ``truncate`` / ``delete``: rot one file of the newest checkpoint of a finished
  run; relaunch without ``--load-fallback`` must refuse in one sentence, with it must resume
  from the previous checkpoint;
* ``nan-bf16`` / ``nan-fp16``: the loss of one random micro-batch turns NaN on rank 1 only
  (``tests/e2e/fault_runner.py``). bf16 must stop with one error line naming the iteration and
  rank 1, and a relaunch resume and finish; fp16 (loss scaling) must skip exactly that
  iteration on every rank and finish.

    .venv/bin/python bench/faults.py --trials 20 --other-trials 5 --json > faults.json

Takes ~20 s per launch on 2 cores; the default (5 and 2 trials) ~15 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from megatron_lsh.training import checkpoint_files  # noqa: E402
from megatron_lsh.training.logger import read_metrics  # noqa: E402
from tests.e2e.util import tiny_run_args, write_synthetic_corpus  # noqa: E402

ITERS = 10
RESUMED = re.compile(r"resumed from .* at iteration (\d+)")
ITERATION = re.compile(r"^ (?:\[[^]]*\] )?iteration +(\d+)/", re.MULTILINE)
"""A log line of an iteration (Megatron's, with or without its timestamp)."""
CASES = ["sigkill", "sigkill-restarts", "sigterm-rank", "sigterm-launcher", "sigstop",
         "full-disk", "bitflip", "truncate", "delete", "nan-bf16", "nan-fp16"]
MICRO_BATCHES = 2
"""Micro-batches per rank and iteration of the tiny runs (global batch 8, micro 2, 2 ranks)."""
STACK_DUMP_AFTER_S = 60.0
"""A job still running this long after its fault is asked for its ranks' stacks (SIGUSR1)."""
NAN_ERROR = re.compile(r"error: the lm loss is nan at iteration (\d+) \(not finite on rank 1\)")


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def _command(corpus: str, work: str, ckpt: str, *, restarts: int = 0, extra=(),
             fault_runner: bool = False) -> list:
    """torchrun of the tiny 2-rank run; ``fault_runner``: through ``tests/e2e/fault_runner.py``
    (the fault named by the ``FAULT`` environment variable patched in)."""
    args = tiny_run_args("gpt", corpus, work, iters=ITERS) + [
        "--expert-model-parallel-size", "2", "--eval-iters", "0", "--log-interval", "1",
        "--save", ckpt, "--load", ckpt, "--save-interval", "2", "--exit-signal-handler",
        "--distributed-timeout-minutes", "0.1", *extra]
    entry = ([str(REPO / "tests/e2e/fault_runner.py"), "gpt"] if fault_runner
             else [str(REPO / "pretrain_gpt_moe.py")])
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--max-restarts={restarts}", "--nproc-per-node=2", *entry, *args]


def _ranks(launcher_pid: int) -> list:
    try:
        with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _run(cmd: list, deadline_s: float, fault=None, env=None) -> dict:
    """Launch; ``fault(launcher, ranks)`` runs once at a random moment. Output, code, times."""
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    fault_at, hung, armed_at, at_fault, dumped = None, False, None, 0, False
    # A random moment: after a random iteration is logged, a random fraction of a step later
    # (forward, all-to-all, optimizer or a save); at least 3 iterations (~0.5 s) stay after it.
    after_iteration, extra_delay = random.randint(1, ITERS - 4), random.uniform(0.0, 0.4)
    while proc.poll() is None:
        now = time.monotonic()
        if fault is not None and fault_at is None:
            if armed_at is None:
                with open(log.name) as f:
                    logged = [int(i) for i in ITERATION.findall(f.read())]
                if logged and max(logged) >= after_iteration:
                    armed_at = now
            ranks = _ranks(proc.pid)
            if armed_at is not None and now - armed_at >= extra_delay and len(ranks) == 2:
                fault_at = now
                with open(log.name) as f:
                    at_fault = max((int(i) for i in ITERATION.findall(f.read())), default=0)
                fault(proc, ranks)
        if fault_at is not None and not dumped and now - fault_at > STACK_DUMP_AFTER_S:
            # Past the normal stop (timeout + torchrun's grace): ask every rank for its
            # threads' stacks (faulthandler on SIGUSR1, registered by the entry point).
            dumped = True
            for pid in _ranks(proc.pid):
                os.kill(pid, signal.SIGUSR1)
        if now - start > deadline_s:
            hung = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    end = time.monotonic()
    for pid in _ranks(proc.pid):
        os.kill(pid, signal.SIGKILL)
    log.seek(0)
    out = log.read()
    iterations = [int(i) for i in ITERATION.findall(out)]
    return {"code": proc.returncode, "out": out, "hung": hung,
            "stop_s": (end - fault_at) if fault_at else None,
            "faulted": fault_at is not None, "last_iteration": max(iterations, default=0),
            "stacks_dumped": dumped,
            "at_fault_iteration": at_fault}


def _corrupt_checkpoints(ckpt: str) -> int:
    """Checkpoint folders with a file that fails its recorded size / checksum."""
    bad = 0
    for iteration in checkpoint_files.saved_iterations(ckpt):
        folder = checkpoint_files.iteration_dir(ckpt, iteration)
        try:
            meta = json.loads(Path(folder, "megatron_lsh_checkpoint.json").read_text())
            for name, record in meta.get("files", {}).items():
                checkpoint_files.verify_file(os.path.join(folder, name), record)
        except (OSError, ValueError, checkpoint_files.CheckpointError):
            bad += 1
    return bad


def _rot(ckpt: str, how: str) -> str:
    latest = checkpoint_files.read_latest(ckpt)
    folder = Path(checkpoint_files.iteration_dir(ckpt, latest))
    path = random.choice(sorted(folder.rglob("*.pt")))
    size = path.stat().st_size
    if how == "bitflip":
        with open(path, "r+b") as f:
            f.seek(random.randrange(0, max(1, size - 4096)))
            f.write(os.urandom(min(4096, size)))
    elif how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(random.randrange(0, size))
    else:
        path.unlink()
    return str(path)


def _nan_trial(case: str, corpus: str, work: str, ckpt: str, row: dict) -> dict:
    """A NaN loss in one random micro-batch of rank 1; bf16 must stop naming it (and resume on
    relaunch), fp16 must skip exactly that iteration on every rank."""
    micro_batch = random.randint(MICRO_BATCHES + 1, MICRO_BATCHES * (ITERS - 1))
    iteration = -(-micro_batch // MICRO_BATCHES)
    metrics = os.path.join(work, "metrics.jsonl")
    precision = ["--bf16"] if case == "nan-bf16" else ["--fp16", "--initial-loss-scale", "128"]
    faulted = _run(_command(corpus, work, ckpt, extra=[*precision, "--metrics-jsonl", metrics],
                            fault_runner=True), 180, env=_env(FAULT=f"nan_rank1:{micro_batch}"))
    row["hangs"] = int(faulted["hung"])
    if case == "nan-bf16":
        errors = [line for line in faulted["out"].splitlines() if "error:" in line]
        named = [int(i) for i in NAN_ERROR.findall(faulted["out"])]
        stopped = faulted["code"] != 0 and named == [iteration] and len(errors) == 1
        again = _run(_command(corpus, work, ckpt, extra=precision), 180)
        loaded = [int(i) for i in RESUMED.findall(again["out"])]
        row["hangs"] += int(again["hung"])
        row["recovered"] = int(stopped and again["code"] == 0 and f"{ITERS}/" in again["out"])
        row["lost_iterations"] = max(0, iteration - 1 - (loaded[0] if loaded else 0))
    else:
        rows = read_metrics(metrics) if os.path.exists(metrics) else []
        skipped = [r["iteration"] for r in rows if r.get("skipped")]
        row["recovered"] = int(faulted["code"] == 0 and skipped == [iteration]
                               and bool(rows) and rows[-1]["iteration"] == ITERS)
    row["corrupt_checkpoints"] = _corrupt_checkpoints(ckpt)
    return row


def trial(case: str, corpus: str, root: Path) -> dict:
    """One trial of ``case`` in a fresh folder; the row's counts for it."""
    work = tempfile.mkdtemp(dir=root)
    ckpt = os.path.join(work, "ckpt")
    row = {"recovered": 0, "lost_iterations": 0, "corrupt_checkpoints": 0, "hangs": 0,
           "corrupt_loaded": 0, "stop_s": None}
    mount = None
    try:
        if case == "full-disk":
            mount = os.path.join(work, "small")
            os.makedirs(mount)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mount], check=True)
            ckpt = os.path.join(mount, "ckpt")
        if case in ("bitflip", "truncate", "delete", "full-disk"):
            first = _run(_command(corpus, work, ckpt), 180)
            if case == "full-disk":
                stopped = first["code"] != 0 and "not enough free space" in first["out"]
                row["recovered"] = int(stopped and checkpoint_files.read_latest(ckpt) is not None
                                       and _corrupt_checkpoints(ckpt) == 0)
                row["hangs"] = int(first["hung"])
                return row
            rotted = _rot(ckpt, case)
            refused = _run(_command(corpus, work, ckpt, extra=["--train-iters", "12"]), 180)
            named = refused["code"] != 0 and rotted in refused["out"]
            resumed = _run(_command(corpus, work, ckpt, extra=["--train-iters", "12",
                                                              "--load-fallback"]), 180)
            loaded = [int(i) for i in RESUMED.findall(resumed["out"])]
            row["corrupt_loaded"] = int(bool(loaded) and loaded[0] == ITERS)
            row["recovered"] = int(named and resumed["code"] == 0 and bool(loaded)
                                   and loaded[0] < ITERS and "12/" in resumed["out"])
            row["lost_iterations"] = ITERS - loaded[0] if loaded else ITERS
            row["hangs"] = int(refused["hung"] or resumed["hung"])
            return row

        if case.startswith("nan-"):
            return _nan_trial(case, corpus, work, ckpt, row)

        def fault(launcher, ranks):
            victim = random.choice(ranks)
            sig = {"sigkill": signal.SIGKILL, "sigkill-restarts": signal.SIGKILL,
                   "sigterm-rank": signal.SIGTERM, "sigstop": signal.SIGSTOP}.get(case)
            if case == "sigterm-launcher":
                launcher.send_signal(signal.SIGTERM)
            else:
                os.kill(victim, sig)

        restarts = 2 if case == "sigkill-restarts" else 0
        faulted = _run(_command(corpus, work, ckpt, restarts=restarts), 240, fault)
        row["hangs"] += int(faulted["hung"])
        row["stop_s"] = faulted["stop_s"]
        if faulted["stacks_dumped"]:
            slow = REPO / "bench/out/faults-slow" / f"{case}-{time.strftime('%H%M%S')}.log"
            slow.parent.mkdir(parents=True, exist_ok=True)
            slow.write_text(faulted["out"])
            print(f"{case}: still running {STACK_DUMP_AFTER_S:.0f} s after the fault; output "
                  f"with the ranks' stacks in {slow}", file=sys.stderr, flush=True)
        if not faulted["faulted"]:
            raise RuntimeError(f"{case}: the run ended before the fault could be injected:\n"
                               f"{faulted['out'][-2000:]}")
        done = faulted["code"] == 0 and f"{ITERS}/" in faulted["out"]
        before = faulted["at_fault_iteration"]   # the last iteration logged before the fault
        if case == "sigkill-restarts":
            loaded = [int(i) for i in RESUMED.findall(faulted["out"])]
            row["recovered"] = int(done)
            row["lost_iterations"] = max(0, before - max(loaded, default=0)) if loaded else 0
        else:
            again = _run(_command(corpus, work, ckpt), 180)
            row["hangs"] += int(again["hung"])
            loaded = [int(i) for i in RESUMED.findall(again["out"])]
            finished = again["code"] == 0 and ("nothing to do" in again["out"]
                                               or f"{ITERS}/" in again["out"])
            row["recovered"] = int((done or finished) and not again["hung"])
            row["lost_iterations"] = max(0, before - loaded[0]) if loaded else 0
        row["corrupt_checkpoints"] = _corrupt_checkpoints(ckpt)
        return row
    finally:
        if mount:
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    """Run the campaign; print the table (or ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=5, help="trials of each SIGKILL case")
    p.add_argument("--other-trials", type=int, default=2, help="trials of every other case")
    p.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/faults.json",
                   help="where the JSON table is written too")
    args = p.parse_args()
    random.seed(args.seed)
    cases = [c for c in args.cases if c != "full-disk" or os.geteuid() == 0]
    with tempfile.TemporaryDirectory(prefix="mlsh_faults_") as tmp:
        root = Path(tmp)
        corpus = write_synthetic_corpus(str(root / "synthetic"))
        table = []
        for case in cases:
            n = args.trials if case.startswith("sigkill") else args.other_trials
            rows = []
            for i in range(n):
                rows.append(trial(case, corpus, root))
                print(f"[{time.strftime('%H:%M:%S')}] {case} {i + 1}/{n}: {rows[-1]}",
                      file=sys.stderr, flush=True)
            stops = [r["stop_s"] for r in rows if r["stop_s"] is not None]
            table.append({"case": case, "trials": n,
                          "recovered": sum(r["recovered"] for r in rows),
                          "lost_iterations": sum(r["lost_iterations"] for r in rows),
                          "corrupt_checkpoints": sum(r["corrupt_checkpoints"] for r in rows),
                          "corrupt_loaded": sum(r["corrupt_loaded"] for r in rows),
                          "hangs": sum(r["hangs"] for r in rows),
                          "max_stop_s": max(stops) if stops else None})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cases": table, "trials": args.trials,
                                    "other_trials": args.other_trials, "seed": args.seed},
                                   indent=1))
    if args.json:
        print(json.dumps({"cases": table}, indent=1))
        return
    print(f"{'case':18s} {'trials':>6s} {'recovered':>9s} {'lost it':>7s} {'corrupt':>7s} "
          f"{'loaded bad':>10s} {'hangs':>5s} {'max s to stop':>13s}")
    for r in table:
        stop = f"{r['max_stop_s']:13.1f}" if r["max_stop_s"] is not None else f"{'-':>13s}"
        print(f"{r['case']:18s} {r['trials']:6d} {r['recovered']:9d} {r['lost_iterations']:7d} "
              f"{r['corrupt_checkpoints']:7d} {r['corrupt_loaded']:10d} {r['hangs']:5d} {stop}")


if __name__ == "__main__":
    main()
