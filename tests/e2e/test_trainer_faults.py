"""The trainer under faults: SIGTERM, SIGKILL during a save, NaN loss, bad --load input."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.util import REPO, read_metrics, run_entry, tiny_run_args, write_synthetic_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(str(tmp_path_factory.mktemp("corpus") / "synthetic"))


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def _fault_run(fault, args, timeout=180):
    cmd = [sys.executable, str(REPO / "tests/e2e/fault_runner.py"), "gpt", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(FAULT=fault), capture_output=True, text=True,
                          timeout=timeout)


def _wait_for_iterations(metrics: str, n: int, timeout: float) -> None:
    """Wait until the run's metrics JSONL holds ``n`` iterations (fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(metrics) and len(read_metrics(metrics)) >= n:
            return
        time.sleep(0.2)
    pytest.fail(f"the run did not reach iteration {n}")


def test_sigterm_saves_at_end_of_iteration_and_exits_zero(tmp_path, corpus):
    metrics, ckpt = str(tmp_path / "m.jsonl"), str(tmp_path / "ckpt")
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=100000) + [
        "--metrics-jsonl", metrics, "--save", ckpt, "--exit-signal-handler"]
    proc = subprocess.Popen([sys.executable, str(REPO / "pretrain_gpt_moe.py"), *args], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for_iterations(metrics, 3, timeout=120)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "because of a termination signal" in out
    last = read_metrics(metrics)[-1]["iteration"]
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == str(last)


def test_sigterm_to_the_launch_wrapper_saves_and_the_job_exits_zero(tmp_path, corpus):
    """SIGTERM to the whole process group of ``python -m megatron_lsh.launch`` (what a
    scheduler sends): the workers save at the end of their iteration, torchrun and the
    wrapper exit 0 (plain torchrun exits 1 here)."""
    metrics, ckpt = str(tmp_path / "m.jsonl"), str(tmp_path / "ckpt")
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=100000) + [
        "--metrics-jsonl", metrics, "--save", ckpt, "--exit-signal-handler",
        "--expert-model-parallel-size", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_lsh.launch", "--standalone",
                             "--nproc-per-node=2", str(REPO / "pretrain_gpt_moe.py"), *args],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_iterations(metrics, 3, timeout=180)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert "asking the 2 workers to save and exit" in out
    assert "because of a termination signal" in out
    last = read_metrics(metrics)[-1]["iteration"]
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == str(last)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, corpus):
    ckpt, metrics = str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl")
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=12) + [
        "--save", ckpt, "--save-interval", "4", "--metrics-jsonl", metrics]
    killed = _fault_run("kill_during_save:8", args)
    assert killed.returncode == -signal.SIGKILL
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "4"
    assert not os.path.exists(os.path.join(ckpt, "iter_0000008"))
    resumed = run_entry("gpt", args + ["--load", ckpt], 1)
    assert "resumed from" in resumed.stdout and "at iteration 4" in resumed.stdout
    assert read_metrics(metrics)[-1]["iteration"] == 12
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "12"


def test_nan_loss_stops_with_iteration_and_rank(tmp_path, corpus):
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=10) + ["--eval-iters", "0"]
    proc = _fault_run("nan_loss:9", args)  # 4 micro-batches per step: call 9 is in iteration 3
    assert proc.returncode == 1
    assert "error: the lm loss is nan at iteration 3 (not finite on rank 0)" in proc.stderr


def _fault_torchrun(fault, args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests/e2e/fault_runner.py"), "gpt", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(FAULT=fault), capture_output=True, text=True,
                          timeout=timeout)


def test_nan_on_one_rank_stops_naming_that_rank_once_in_bf16(tmp_path, corpus):
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=8) + [
        "--eval-iters", "0", "--bf16", "--expert-model-parallel-size", "2"]
    proc = _fault_torchrun("nan_rank1:5", args)   # 2 micro-batches per rank: iteration 3
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == ["error: the lm loss is nan at iteration 3 (not finite on rank 1): stopping "
                      "(use --fp16 loss scaling to skip such steps, or lower the learning "
                      "rate)"], proc.stderr[-3000:]


def test_nan_on_one_rank_is_skipped_on_every_rank_in_fp16(tmp_path, corpus):
    metrics = str(tmp_path / "m.jsonl")
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=8) + [
        "--eval-iters", "0", "--fp16", "--initial-loss-scale", "128",
        "--expert-model-parallel-size", "2",
        "--metrics-jsonl", metrics, "--log-interval", "1"]
    proc = _fault_torchrun("nan_rank1:5", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(metrics)
    assert [r["iteration"] for r in rows if r["skipped"]] == [3]
    assert rows[-1]["iteration"] == 8
    assert all(r["lm_loss"] is not None and r["lm_loss"] == r["lm_loss"]
               for r in rows if not r["skipped"])


def test_missing_load_directory_starts_from_scratch(tmp_path, corpus):
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=3) + [
        "--load", str(tmp_path / "does-not-exist")]
    proc = run_entry("gpt", args, 1)
    assert "does-not-exist" in proc.stdout and "from scratch" in proc.stdout
    assert "'iteration': 3," in proc.stdout


def test_another_model_is_refused_and_another_layout_reshards(tmp_path, corpus):
    ckpt = str(tmp_path / "ckpt")
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=3) + ["--save", ckpt]
    saved = run_entry("gpt", args + ["--expert-model-parallel-size", "2"], 2)
    assert "outlived the process group" not in saved.stderr   # no group leaks past the run
    proc = run_entry("gpt", args + ["--load", ckpt, "--num-experts", "8"], 2, check=False)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    # Every rank fails alike: rank 0 speaks for all, in one line.
    assert len(ours) == 1 and ours[0].endswith("was saved for another model: num-experts=4, "
                                               "this run has num-experts=8"), proc.stderr
    # torchrun reports the failed workers with its own traceback; ours print none.
    assert "megatron_lsh/" not in proc.stderr, proc.stderr[-3000:]
    # The same model in another layout (EP 2 -> 1) loads by resharding.
    proc = run_entry("gpt", args + ["--load", ckpt], 2)
    assert "resharded (ep 2 -> 1" in proc.stdout and "'iteration': 3," in proc.stdout


def test_rerun_after_the_last_iteration_does_nothing(tmp_path, corpus):
    ckpt = str(tmp_path / "ckpt")
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=3) + ["--save", ckpt, "--load", ckpt]
    run_entry("gpt", args, 1)
    again = run_entry("gpt", args, 1)
    assert "already trained to iteration 3 (--train-iters 3): nothing to do" in again.stdout


def _errors(proc):
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "error: " in line]


def test_token_ids_beyond_the_vocabulary_are_one_sentence_before_training(tmp_path, corpus):
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=3)
    args[args.index("--vocab-size") + 1] = "100"
    from megatron_lsh.data.indexed import IndexedDataset
    from megatron_lsh.tokenizer import build_tokenizer
    data = IndexedDataset(f"{corpus}_document")
    largest = max(int(data[i].max()) for i in range(len(data)))
    vocab = build_tokenizer("NullTokenizer", vocab_size=100).vocab_size
    proc = run_entry("gpt", args, 2, check=False)
    assert proc.returncode != 0
    assert _errors(proc) == [f"error: dataset {corpus}_document.bin holds token id {largest} but "
                             f"the vocabulary has {vocab} tokens (ids 0..{vocab - 1}): it was "
                             f"preprocessed with another tokenizer, or --vocab-size is too "
                             f"small"], proc.stderr
    assert "megatron_lsh/" not in proc.stderr, proc.stderr[-3000:]


def test_zero_learning_rate_is_refused(tmp_path, corpus):
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=3)
    args[args.index("--lr") + 1] = "0"
    proc = run_entry("gpt", args, 1, check=False)
    assert proc.returncode != 0
    assert _errors(proc) == ["pretrain_gpt_moe.py: error: --lr must be positive, got 0.0: with a "
                             "learning rate of 0 "
                             "the weights never change"]


def test_corrupt_latest_checkpoint_stops_or_falls_back_and_old_ones_are_pruned(tmp_path, corpus):
    ckpt = str(tmp_path / "ckpt")
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=6) + [
        "--save", ckpt, "--save-interval", "2", "--eval-iters", "0"]
    run_entry("gpt", args + ["--keep-last-n-checkpoints", "2"], 1)
    assert sorted(os.listdir(ckpt)) == ["iter_0000004", "iter_0000006",
                                        "latest_checkpointed_iteration.txt"]
    path = os.path.join(ckpt, "iter_0000006", "mp_rank_00", "model_optim_rng.pt")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 4096)
    resume = [a if a != "6" else "8" for a in args] + ["--load", ckpt]
    stopped = run_entry("gpt", resume, 1, check=False)
    assert stopped.returncode == 1
    assert _errors(stopped) == [f"error: checkpoint file {path} is corrupt: its sha256 does not "
                                f"match the one recorded at save"]
    fell_back = run_entry("gpt", resume + ["--load-fallback"], 1)
    assert (f"WARNING: loaded iteration 4 instead of 6: checkpoint file {path} is corrupt"
            in fell_back.stdout)
    assert "at iteration 4" in fell_back.stdout and "'iteration': 8," in fell_back.stdout
    chosen = run_entry("gpt", resume + ["--ckpt-step", "4", "--train-iters", "5"], 1)
    assert "resumed from" in chosen.stdout and "at iteration 4" in chosen.stdout


def test_a_hung_rank_is_named_within_the_timeout(tmp_path, corpus):
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=8) + [
        "--distributed-timeout-minutes", "0.1", "--eval-iters", "0",
        "--expert-model-parallel-size", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests/e2e/fault_runner.py"), "gpt", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(FAULT="stop_rank1:4"), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode != 0
    assert _errors(proc) == [
        "error: the forward-backward (MoE all-to-all, pipeline send/receive) of iteration 4 "
        "timed out after 6 s: rank 1 did not reach it (rank 1 last seen in loss all-reduce of "
        "iteration 3)"], proc.stderr[-3000:]
    assert time.monotonic() - start < 120


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def test_ranks_die_with_their_launcher(tmp_path, corpus):
    metrics = str(tmp_path / "m.jsonl")
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=100000) + [
        "--metrics-jsonl", metrics, "--expert-model-parallel-size", "2"]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node=2", str(REPO / "pretrain_gpt_moe.py"), *args],
                                cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    ranks = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
                os.path.exists(metrics) and len(read_metrics(metrics)) >= 2):
            time.sleep(0.2)
        ranks = _children(launcher.pid)
        assert len(ranks) == 2, "the launcher should have two rank processes"
        launcher.kill()                       # SIGKILL: the launcher cannot forward anything
        launcher.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and
                                                  open(f"/proc/{p}/stat").read().split()[2] != "Z"
                                                  for p in ranks):
            time.sleep(0.2)
        alive = [p for p in ranks if os.path.exists(f"/proc/{p}")
                 and open(f"/proc/{p}/stat").read().split()[2] != "Z"]
        assert not alive, f"ranks {alive} outlived their launcher"
    finally:
        for p in ranks:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if launcher.poll() is None:
            launcher.kill()


def test_elastic_restart_resumes_from_the_last_checkpoint(tmp_path, corpus):
    # Attempt 0 loses rank 1 at iteration 8; torchrun restarts both ranks, which must
    # rendezvous afresh (not with the dead attempt's peers) and resume from iteration 6.
    ckpt = str(tmp_path / "ckpt")
    args = tiny_run_args("gpt", corpus, str(tmp_path), iters=12) + [
        "--distributed-timeout-minutes", "0.2", "--eval-iters", "0", "--save", ckpt,
        "--load", ckpt, "--save-interval", "3", "--expert-model-parallel-size", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts", "2",
           "--nproc-per-node=2", str(REPO / "tests/e2e/fault_runner.py"), "gpt", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(FAULT="kill_rank1_once:8"),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at iteration 6 (48 samples consumed)" in proc.stdout
    assert "> done: {'iteration': 12," in proc.stdout
    assert "connectFullMesh failed" not in proc.stderr
