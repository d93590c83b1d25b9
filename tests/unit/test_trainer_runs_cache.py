"""bench/trainer_runs.py's cache: a run of another model shape or machine is never reused."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import trainer_runs  # noqa: E402


def _write(path: Path, **fields) -> Path:
    result = {"variant": "none", "valid": [[600, 5.0]], "shape": trainer_runs.SMALL_SHAPE}
    result.update(fields)
    path.write_text(json.dumps(result))
    return path


def test_cache_of_this_machine_and_shape_is_reused(tmp_path):
    cache = _write(tmp_path / "a.json", machine=trainer_runs.machine())
    assert trainer_runs.load_cached(cache)["valid"] == [[600, 5.0]]
    # Caches written before results recorded the machine are still read.
    assert trainer_runs.load_cached(_write(tmp_path / "b.json")) is not None


def test_cache_of_another_machine_or_shape_is_ignored(tmp_path, capsys):
    other = dict(trainer_runs.machine(), isa="AVX2-elsewhere")
    assert trainer_runs.load_cached(_write(tmp_path / "c.json", machine=other)) is None
    assert "another machine" in capsys.readouterr().err
    assert trainer_runs.load_cached(_write(tmp_path / "d.json", shape=["--num-layers", "2"])) is None
    assert "another model shape" in capsys.readouterr().err
    assert trainer_runs.load_cached(tmp_path / "missing.json") is None


def test_machine_names_cpu_isa_and_torch():
    info = trainer_runs.machine()
    assert set(info) == {"cpu", "isa", "torch"} and info["torch"]
