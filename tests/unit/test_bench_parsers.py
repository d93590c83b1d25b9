"""The benchmarks read the trainer's console output with regular expressions; each must match
the line the trainer prints today (a changed log format once disarmed every timed fault of
``bench/faults.py``: it waited for an iteration line that no longer matched)."""
import importlib.util
import os
import sys

from megatron_lsh.training.logger import format_iteration_line, format_validation_box

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench(name):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                      os.path.join(ROOT, "bench", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))


def test_faults_finds_the_iteration_lines_of_the_log():
    faults = _bench("faults")
    lines = [format_iteration_line(i, 10, 8 * i, 120.0, 1e-3, 8, {"lm loss": 6.2}, 1.0, 1.1, 0,
                                   compression_rate=0.5, bytes_fwd=1e5, bytes_bwd=1e5)
             for i in (3, 4)]
    log = "\n".join(["> saved checkpoint at iteration 2", *lines,
                     format_validation_box(4, {"lm loss": 6.1})])
    assert [int(i) for i in faults.ITERATION.findall(log)] == [3, 4]


def test_faults_and_trainer_runs_read_the_resume_nan_and_validation_lines():
    faults, runs = _bench("faults"), _bench("trainer_runs")
    text = open(os.path.join(ROOT, "megatron_lsh", "training", "loop.py")).read()
    assert 'f"> resumed from {load_dir} at iteration {self.iteration} "' in text
    assert faults.RESUMED.findall("> resumed from /c at iteration 6 (3 s)") == ["6"]
    assert faults.NAN_ERROR.findall("error: the lm loss is nan at iteration 3 (not finite on "
                                    "rank 1): stopping") == ["3"]
    box = format_validation_box(600, {"lm loss": 5.2475})
    assert [(int(i), float(v)) for i, v in runs.VALID_RE.findall(box)] == [(600, 5.2475)]
