"""SIGTERM -> finish the iteration, save, exit 0; all ranks stop together; the time limit."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_lsh.parallel.spawn import run_distributed
from megatron_lsh.training.signals import DistributedSignalHandler, ExitDurationTimer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_TINY_LOOP = textwrap.dedent("""
    import sys, time
    from megatron_lsh.training.signals import DistributedSignalHandler
    ready, saved = sys.argv[1:3]
    with DistributedSignalHandler() as handler:
        for iteration in range(1, 100000):
            time.sleep(0.01)  # the "train step"
            if iteration == 3:
                open(ready, "w").close()
            if handler.any_received():
                with open(saved, "w") as f:  # the "checkpoint"
                    f.write(str(iteration))
                sys.exit(0)
    sys.exit(3)
""")


def test_sigterm_makes_a_loop_save_and_exit_zero(tmp_path):
    ready, saved = tmp_path / "ready", tmp_path / "saved"
    proc = subprocess.Popen([sys.executable, "-c", _TINY_LOOP, str(ready), str(saved)],
                            env=dict(os.environ, PYTHONPATH=ROOT), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert int(saved.read_text()) >= 3


def test_handler_records_the_signal_and_restores_the_previous_one():
    previous = signal.getsignal(signal.SIGUSR1)
    with DistributedSignalHandler(signal.SIGUSR1) as handler:
        assert not handler.received and not handler.any_received()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.received and handler.any_received()
        assert handler.signals_received() == [True]
    assert signal.getsignal(signal.SIGUSR1) is previous
    assert handler.release() is False


def _stop_together(rank, world):
    with DistributedSignalHandler(signal.SIGUSR1) as handler:
        for iteration in range(1, 50):
            if rank == 1 and iteration == 4:
                os.kill(os.getpid(), signal.SIGUSR1)
            if handler.any_received():
                stopped = iteration, handler.received, handler.signals_received()
                break
    # Rank 2 started earlier (its clock says 2 minutes): everyone must stop with it.
    start = time.time() - (120 if rank == 2 else 0)
    return stopped, ExitDurationTimer(1.0, start_time=start).expired()


def test_all_ranks_stop_at_the_same_iteration():
    results = run_distributed(_stop_together, 3, timeout=60)
    assert [r[0][0] for r in results] == [4, 4, 4]
    assert [r[0][1] for r in results] == [False, True, False]
    assert all(r[0][2] == [False, True, False] for r in results)
    assert [r[1] for r in results] == [True, True, True]  # the time limit, agreed


def test_exit_duration_timer():
    assert not ExitDurationTimer(None).expired()
    assert not ExitDurationTimer(1.0).expired()
    timer = ExitDurationTimer(1.0, start_time=time.time() - 61)
    assert timer.expired() and timer.elapsed_minutes() > 1.0
    with pytest.raises(ValueError, match="exit-duration-in-mins must be positive, got 0"):
        ExitDurationTimer(0)


def test_handler_installs_on_construction_and_refuses_other_threads():
    import threading
    previous = signal.getsignal(signal.SIGUSR2)
    handler = DistributedSignalHandler(signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGUSR2)
    assert handler.any_received()
    assert handler.release() and signal.getsignal(signal.SIGUSR2) is previous
    errors = []
    thread = threading.Thread(target=lambda: errors.append(
        pytest.raises(RuntimeError, DistributedSignalHandler, signal.SIGUSR2)), name="worker")
    thread.start()
    thread.join()
    assert "must be installed from the main thread, not worker" in str(errors[0].value)
