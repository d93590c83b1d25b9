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


def _train_kw(tmp_path):
    return dict(seed=1, iters=40, out_dir=tmp_path, data_dir=tmp_path, tokenizer_dir=tmp_path)


def test_branched_runs_are_cached_apart_from_the_run_they_start_from(tmp_path):
    kw = dict(seed=1, iters=40, out_dir=tmp_path)
    _write(tmp_path / "gpt-lsh-seed1-it40.json", machine=trainer_runs.machine())
    assert trainer_runs.cached("gpt", "lsh", **kw) is not None
    assert trainer_runs.cached("gpt", "lsh", branch_at=20, **kw) is None
    _write(tmp_path / "gpt-lsh-seed1-it40-from20.json", valid=[[40, 4.0]],
           machine=trainer_runs.machine())
    assert trainer_runs.cached("gpt", "lsh", branch_at=20, **kw)["valid"] == [[40, 4.0]]
    assert trainer_runs.checkpoint_dir("gpt", "none", **kw) == tmp_path / "gpt-none-seed1-it40-ckpt"


def test_branching_from_a_missing_checkpoint_is_one_clear_error(tmp_path):
    ckpt = tmp_path / "gpt-none-seed1-it40-ckpt"
    (ckpt / "iter_0000010").mkdir(parents=True)
    try:
        trainer_runs.train("gpt", "lsh", [], branch_from=(ckpt, 20), **_train_kw(tmp_path))
    except RuntimeError as error:
        assert str(error) == (f"gpt-lsh-seed1-it40-from20: no checkpoint of iteration 20 in "
                              f"{ckpt} to branch from")
    else:
        raise AssertionError("branching from a checkpoint that does not exist did not fail")


def test_a_cached_run_is_reused_only_when_it_kept_the_checkpoint_asked_for(tmp_path, monkeypatch):
    _write(tmp_path / "gpt-none-seed1-it40.json", machine=trainer_runs.machine())
    launched = []

    def fake_run(cmd, **_):   # stands in for torchrun: record the command, fail the launch
        launched.append(cmd)
        raise RuntimeError("launched")
    monkeypatch.setattr(trainer_runs.subprocess, "run", fake_run)
    kw = _train_kw(tmp_path)
    assert trainer_runs.train("gpt", "none", [], **kw)["valid"] == [[600, 5.0]]
    assert launched == []
    ckpt = tmp_path / "gpt-none-seed1-it40-ckpt"
    try:   # the cached run lacks its iteration-20 checkpoint: it is trained again, saving it
        trainer_runs.train("gpt", "none", [], save_interval=20, **kw)
    except RuntimeError:
        pass
    assert len(launched) == 1
    cmd = launched[0]
    assert cmd[cmd.index("--save") + 1] == str(ckpt) and cmd[cmd.index("--save-interval") + 1] == "20"
    (ckpt / "iter_0000020").mkdir(parents=True)
    assert trainer_runs.train("gpt", "none", [], save_interval=20, **kw)["valid"] == [[600, 5.0]]
    assert len(launched) == 1
