"""``tools/repeat_suite.sh`` runs a pytest selection N times and counts the failed runs: a test
that fails only on some runs must show up as such, not be averaged away."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FLAKY = '''
import os

def test_fails_on_every_second_run():
    path = os.path.join(os.environ["COUNTER_DIR"], "count")
    count = int(open(path).read()) if os.path.exists(path) else 0
    open(path, "w").write(str(count + 1))
    assert count % 2 == 0
'''


def test_counts_each_failed_run_and_names_the_failing_test(tmp_path):
    (tmp_path / "test_flaky.py").write_text(FLAKY)
    env = dict(os.environ, PY=sys.executable, OUT=str(tmp_path / "logs"),
               COUNTER_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "tools" / "repeat_suite.sh"), "3",
                           str(tmp_path / "test_flaky.py"), "--rootdir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [("rc 0" in line, "rc 1" in line) for line in lines[:3]] == [
        (True, False), (False, True), (True, False)]
    assert "test_fails_on_every_second_run" in lines[1]
    assert lines[-1].startswith("1 of 3 runs failed")
    assert sorted(os.listdir(tmp_path / "logs")) == ["run_1.log", "run_2.log", "run_3.log"]


def test_refuses_a_missing_run_count():
    proc = subprocess.run(["bash", str(REPO / "tools" / "repeat_suite.sh"), "tests/unit"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage: bash tools/repeat_suite.sh RUNS" in proc.stderr
