"""Checkpoints, one process: layout, round trip, atomicity under SIGKILL, unsafe files, errors."""
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from megatron_lsh.config import MegatronLSHConfig
from megatron_lsh.parallel import random as mp_random
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups
from megatron_lsh.training import checkpoint_files
from megatron_lsh.training import checkpointing as ckpt
from megatron_lsh.training.checkpointing import CheckpointError, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SINGLE = ProcessGroups.single()
LAYOUT = ckpt.parallel_layout(SINGLE)


def make_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"embedding.weight": torch.randn(8, 4, generator=g), "head.bias": torch.zeros(3)},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(8, 4, generator=g), "step": 5}},
                      "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "opt_param_scheduler": {"num_steps": 5, "max_lr": 1e-3},
        "loss_scaler": {"scale": 65536.0},
        "rng_state": mp_random.state_dict(),
        "consumed_train_samples": 40 + seed,
        "config": MegatronLSHConfig().to_dict(),
    }


def reseal(folder, name):
    """Record a file's current size and checksum in the metadata, as if saved that way: a file
    written by another tool or an older version, so the checks after the checksum run."""
    meta_path = os.path.join(folder, ckpt.METADATA_FILE)
    meta = json.loads(open(meta_path).read())
    meta["files"][name] = checkpoint_files.file_record(os.path.join(folder, name))
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_folder_names_follow_megatron():
    assert ckpt.rank_dir_name(0, 0, 0, pp_size=1, ep_size=1) == "mp_rank_00"
    assert ckpt.rank_dir_name(1, 2, 0, pp_size=4, ep_size=1) == "mp_rank_01_002"
    assert ckpt.rank_dir_name(1, 0, 3, pp_size=1, ep_size=4) == "mp_rank_01_003"
    assert ckpt.rank_dir_name(1, 2, 3, pp_size=4, ep_size=4) == "mp_rank_01_002_003"
    assert ckpt.iteration_dir("/c", 200) == "/c/iter_0000200"
    assert ckpt.distrib_optim_file(3) == "distrib_optim_dp003.pt"


@pytest.mark.parametrize("world, tp, pp, ep", [(8, 2, 2, 1), (4, 1, 1, 4), (8, 2, 1, 2),
                                                (8, 2, 1, 4), (8, 1, 2, 2)])
def test_exactly_one_writer_per_position(world, tp, pp, ep):
    dims = ParallelDims(world, tp=tp, pp=pp, ep=ep)
    writers, positions = {}, set()
    for rank in range(world):
        g = ProcessGroups(dims, rank, *[None] * 7, [rank], [rank])  # coordinates only
        position = (g.tp_rank, g.pp_rank, g.ep_rank)
        positions.add(position)
        if ckpt.is_checkpoint_writer(g):
            assert position not in writers
            writers[position] = rank
    assert set(writers) == positions


def test_round_trip_restores_every_entry_and_writes_megatron_files(tmp_path):
    state = make_state()
    final = save_checkpoint(7, state, str(tmp_path), SINGLE)
    assert final == str(tmp_path / "iter_0000007")
    assert (tmp_path / ckpt.LATEST_FILE).read_text() == "7\n"
    # Not metadata.json: Megatron-LM reads that name as its distributed-checkpoint config.
    assert sorted(os.listdir(final)) == ["megatron_lsh_checkpoint.json", "mp_rank_00"]
    assert os.listdir(os.path.join(final, "mp_rank_00")) == ["model_optim_rng.pt"]
    metadata = json.loads((tmp_path / "iter_0000007" / ckpt.METADATA_FILE).read_text())
    assert metadata["parallel_layout"] == LAYOUT and metadata["megatron_lsh_format"] == 2
    assert "checkpoint_version" not in metadata   # that key is Megatron's own state-dict version
    iteration, loaded = load_checkpoint(str(tmp_path), SINGLE, expected_layout=LAYOUT)
    assert iteration == 7
    assert loaded["megatron_lsh_format"] == ckpt.CHECKPOINT_VERSION and loaded["iteration"] == 7
    assert "checkpoint_version" not in loaded
    assert loaded.pop("parallel_layout") == LAYOUT
    for key in ("megatron_lsh_format", "iteration"):
        loaded.pop(key)
    assert_same(state, loaded)


def test_format_1_checkpoints_still_load(tmp_path):
    """Before format 2 the metadata was metadata.json and the version checkpoint_version."""
    state = make_state()
    final = save_checkpoint(3, state, str(tmp_path), SINGLE)
    os.rename(os.path.join(final, ckpt.METADATA_FILE), os.path.join(final, "metadata.json"))
    path = os.path.join(final, "mp_rank_00", "model_optim_rng.pt")
    old = torch.load(path, weights_only=True)
    old["checkpoint_version"] = 1
    del old["megatron_lsh_format"]
    torch.save(old, path)
    meta_path = os.path.join(final, "metadata.json")
    meta = json.loads(open(meta_path).read())
    meta["files"]["mp_rank_00/model_optim_rng.pt"] = checkpoint_files.file_record(path)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    iteration, loaded = load_checkpoint(str(tmp_path), SINGLE, expected_layout=LAYOUT)
    assert iteration == 3 and loaded["checkpoint_version"] == 1
    assert_same(state["model"], loaded["model"])


def test_rng_state_restores_the_random_streams(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    save_checkpoint(1, {"rng_state": mp_random.state_dict()}, str(tmp_path), SINGLE)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(99)
    np.random.seed(99)
    _, loaded = load_checkpoint(str(tmp_path), SINGLE, expected_layout=LAYOUT)
    mp_random.load_state_dict(loaded["rng_state"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])


def test_latest_moves_forward_and_resaving_an_iteration_replaces_it(tmp_path):
    save_checkpoint(1, make_state(1), str(tmp_path), SINGLE)
    save_checkpoint(2, make_state(2), str(tmp_path), SINGLE)
    assert load_checkpoint(str(tmp_path), SINGLE, expected_layout=LAYOUT)[0] == 2
    save_checkpoint(2, make_state(5), str(tmp_path), SINGLE)
    _, loaded = load_checkpoint(str(tmp_path), SINGLE, expected_layout=LAYOUT)
    assert loaded["consumed_train_samples"] == 45
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000002", ckpt.LATEST_FILE]


def test_per_dp_rank_state_is_a_separate_file(tmp_path):
    shard = {"fp32_params": torch.arange(6.0), "exp_avg": torch.ones(6)}
    save_checkpoint(3, {"model": {}}, str(tmp_path), SINGLE, per_dp_rank_state=shard)
    assert sorted(os.listdir(tmp_path / "iter_0000003" / "mp_rank_00")) == [
        "distrib_optim_dp000.pt", "model_optim_rng.pt"]
    _, loaded = load_checkpoint(str(tmp_path), SINGLE, expected_layout=LAYOUT)
    assert_same(loaded["per_dp_rank_state"], shard)
    os.remove(tmp_path / "iter_0000003" / "mp_rank_00" / "distrib_optim_dp000.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint file .*distrib_optim_dp000.pt is missing"):
        load_checkpoint(str(tmp_path), SINGLE, expected_layout=LAYOUT)


def test_nothing_to_load_returns_none(tmp_path):
    assert load_checkpoint(str(tmp_path / "absent"), SINGLE, expected_layout=LAYOUT) is None
    assert load_checkpoint(str(tmp_path), SINGLE, expected_layout=LAYOUT) is None  # empty folder
    warning = ckpt.no_checkpoint_warning(str(tmp_path / "absent"))
    assert "absent" in warning and "from scratch" in warning


def test_load_errors_name_the_file(tmp_path):
    root = str(tmp_path)
    save_checkpoint(4, make_state(), root, SINGLE)
    latest = tmp_path / ckpt.LATEST_FILE
    latest.write_text("four\n")
    with pytest.raises(CheckpointError, match=r"latest_checkpointed_iteration.txt should hold an "
                                              r"iteration number but holds 'four'"):
        load_checkpoint(root, SINGLE, expected_layout=LAYOUT)
    latest.write_text("9\n")
    with pytest.raises(CheckpointError, match=r"points at iteration 9 but folder .*iter_0000009 "
                                              r"does not exist"):
        load_checkpoint(root, SINGLE, expected_layout=LAYOUT)
    latest.unlink()
    with pytest.raises(CheckpointError, match=r"holds checkpoint folders but no "
                                              r"latest_checkpointed_iteration.txt"):
        load_checkpoint(root, SINGLE, expected_layout=LAYOUT)
    latest.write_text("4\n")
    (tmp_path / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint file .*iter_0000004/mp_rank_00/"
                                              r"model_optim_rng.pt is missing"):
        load_checkpoint(root, SINGLE, expected_layout=LAYOUT)
    (tmp_path / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"PK\x03\x04xx")
    reseal(tmp_path / "iter_0000004", "mp_rank_00/model_optim_rng.pt")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint file .*model_optim_rng.pt"):
        load_checkpoint(root, SINGLE, expected_layout=LAYOUT)


class _RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_file_that_would_run_code_is_refused(tmp_path, writer):
    root = str(tmp_path)
    save_checkpoint(1, make_state(), root, SINGLE)
    marker = tmp_path / "pwned"
    path = tmp_path / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    payload = {"model": {"w": torch.ones(1)}, "evil": _RunsCode(marker)}
    with open(path, "wb") as f:
        pickle.dump(payload, f) if writer == "pickle" else torch.save(payload, f)
    reseal(tmp_path / "iter_0000001", "mp_rank_00/model_optim_rng.pt")
    with pytest.raises(CheckpointError, match=rf"refusing to load {path}: it holds objects other "
                                              rf"than tensors and plain python values"):
        load_checkpoint(root, SINGLE, expected_layout=LAYOUT)
    assert not marker.exists()
    if writer == "torch.save":
        with pytest.raises(CheckpointError, match=r"\(it refers to posix.system\), and unpickling"):
            load_checkpoint(root, SINGLE, expected_layout=LAYOUT)


def test_state_that_cannot_be_loaded_safely_is_refused_at_save(tmp_path):
    root = str(tmp_path)
    save_checkpoint(1, make_state(), root, SINGLE)
    bad = {"model": {"w": torch.ones(1)}, "rng": {"numpy": np.zeros(3)}}
    with pytest.raises(CheckpointError, match=r"checkpoint state\['rng'\]\['numpy'\] is a "
                                              r"numpy.ndarray, which torch.load\(weights_only=True\)"
                                              r" cannot read back"):
        save_checkpoint(2, bad, root, SINGLE)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", ckpt.LATEST_FILE]
    assert ckpt.read_latest(root) == 1


def test_another_model_is_refused_with_both_named(tmp_path):
    root = str(tmp_path)
    saved = dict(LAYOUT, tensor_model_parallel_size=2, num_experts=8)
    save_checkpoint(1, make_state(), root, SINGLE, layout=saved)
    with pytest.raises(CheckpointError, match=r"checkpoint .*iter_0000001 was saved for another "
                                              r"model: num-experts=8, this run has "
                                              r"num-experts=16$"):
        load_checkpoint(root, SINGLE, expected_layout=dict(LAYOUT, num_experts=16))
    # Without the metadata (e.g. written by another tool) the rank file's copy is checked.
    os.remove(tmp_path / "iter_0000001" / ckpt.METADATA_FILE)
    with pytest.raises(CheckpointError, match=r"saved for another model: num-experts=8"):
        load_checkpoint(root, SINGLE, expected_layout=dict(LAYOUT, num_experts=16))


def test_another_layout_loads_for_resharding_and_a_missing_shard_is_named(tmp_path):
    """Only parallel sizes differ: the load returns the layout-free state to reshard from.
    This fake 'tp 2' checkpoint holds one TP shard only: resharding names what is missing."""
    from megatron_lsh.training.reshard import Resharder
    root = str(tmp_path)
    save_checkpoint(1, {"model": {"weight": torch.ones(2, 2)}, "iteration": 1,
                        "consumed_samples": 8},
                    root, SINGLE, layout=dict(LAYOUT, tensor_model_parallel_size=2))
    iteration, state = load_checkpoint(root, SINGLE, expected_layout=LAYOUT)
    assert iteration == 1 and state["saved_layout"]["tensor_model_parallel_size"] == 2
    assert state["consumed_samples"] == 8 and "model" not in state
    model = torch.nn.Linear(2, 4, bias=False)
    model.weight.tensor_model_parallel, model.weight.partition_dim = True, 0
    with pytest.raises(CheckpointError, match=r"^the checkpoint has no shard of 'weight' at tp "
                                              r"rank 1$"):
        Resharder(state["reshard_from"], SINGLE).load_model(model)


def test_newer_format_version_is_refused(tmp_path):
    save_checkpoint(1, {"model": {}}, str(tmp_path), SINGLE)
    path = tmp_path / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=True)
    state["megatron_lsh_format"] = ckpt.CHECKPOINT_VERSION + 1
    torch.save(state, path)
    reseal(tmp_path / "iter_0000001", "mp_rank_00/model_optim_rng.pt")
    with pytest.raises(CheckpointError, match=r"has format version 3, newer than this code's 2"):
        load_checkpoint(str(tmp_path), SINGLE, expected_layout=LAYOUT)


_CRASHING_SAVE = textwrap.dedent("""
    import sys, time, torch
    from megatron_lsh.parallel.dims import ProcessGroups
    from megatron_lsh.training.checkpointing import save_checkpoint
    root, stop_at, marker = sys.argv[1:4]
    def on_stage(stage, path):
        if stage == stop_at:
            open(marker, "w").close()
            time.sleep(120)  # the test SIGKILLs us here
    save_checkpoint(2, {"model": {"w": torch.full((4,), 2.0)}}, root, ProcessGroups.single(),
                    per_dp_rank_state={"shard": torch.ones(4)}, on_stage=on_stage)
""")


def _save_and_get_killed(root, stop_at):
    marker = os.path.join(root, f"..{stop_at}.marker")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_SAVE, root, stop_at, marker], env=env,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(marker):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the save never reached the crash point"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup code runs
        proc.wait()
    os.remove(marker)
    assert proc.returncode == -9


@pytest.mark.parametrize("stop_at", ["file", "renamed"])
def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, stop_at):
    root = str(tmp_path / "ckpt")
    save_checkpoint(1, {"model": {"w": torch.full((4,), 1.0)}}, root, SINGLE)
    _save_and_get_killed(root, stop_at)  # "file": after one of two files; "renamed": before latest
    assert ckpt.read_latest(root) == 1
    leftovers = sorted(os.listdir(root))
    if stop_at == "file":
        assert leftovers[0] == "iter_0000001" and leftovers[1].startswith("iter_0000002.tmp-")
    else:
        assert leftovers == ["iter_0000001", "iter_0000002", ckpt.LATEST_FILE]
    iteration, state = load_checkpoint(root, SINGLE, expected_layout=LAYOUT)
    assert iteration == 1 and torch.equal(state["model"]["w"], torch.full((4,), 1.0))
    # The next save cleans up and completes.
    save_checkpoint(2, {"model": {"w": torch.full((4,), 3.0)}}, root, SINGLE)
    assert sorted(os.listdir(root)) == ["iter_0000001", "iter_0000002", ckpt.LATEST_FILE]
    iteration, state = load_checkpoint(root, SINGLE, expected_layout=LAYOUT)
    assert iteration == 2 and torch.equal(state["model"]["w"], torch.full((4,), 3.0))


def test_crash_in_the_middle_of_replacing_an_iteration_is_recovered(tmp_path):
    root = str(tmp_path)
    save_checkpoint(1, {"model": {"w": torch.ones(2)}}, root, SINGLE)
    # Re-saving iteration 1 moves the old folder aside for an instant: simulate a crash there.
    os.rename(tmp_path / "iter_0000001", tmp_path / "iter_0000001.old-0badc0de")
    iteration, state = load_checkpoint(root, SINGLE, expected_layout=LAYOUT)
    assert iteration == 1 and torch.equal(state["model"]["w"], torch.ones(2))
    save_checkpoint(2, {"model": {"w": torch.zeros(2)}}, root, SINGLE)
    assert sorted(os.listdir(root)) == ["iter_0000001", "iter_0000002", ckpt.LATEST_FILE]


def _gpt_moe(**moe):
    from megatron_lsh.config import ModelConfig, MoEConfig
    from megatron_lsh.models import build_model
    shape = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                 seq_length=8, vocab_size=64)
    mp_random.model_parallel_seed(3, SINGLE)
    return build_model("gpt", ModelConfig(**{**shape, **moe.pop("model", {})}),
                       MoEConfig(num_experts=2, moe_layer_freq=1, **moe), seed=3)


def test_a_changed_compressor_loads_and_says_so_other_mismatches_are_one_sentence():
    from megatron_lsh.moe.compressors import compression
    lsh = _gpt_moe(**compression("lsh", num_hashes=4))
    saved = {n: t.clone() for n, t in lsh.state_dict().items()}
    lines = []
    # Layer 1 without compression, layer 2 with other hash counts: the checkpoint's rotations
    # are dropped or of another shape; every trained tensor still loads.
    other = _gpt_moe(**compression("lsh", num_hashes=2), a2a_compression_skip_layers=(1,))
    seeded = {n: t.clone() for n, t in other.state_dict().items() if ".compressor." in n}
    ckpt.load_model_state(other, saved, "checkpoint c iteration 4", lines.append)
    for name, tensor in other.state_dict().items():
        expected = seeded[name] if ".compressor." in name else saved[name]
        assert torch.equal(tensor, expected), name
    assert len(lines) == 1 and "compressor's state differs from the checkpoint's" in lines[0]
    wider = _gpt_moe(**compression("lsh", num_hashes=4), model=dict(ffn_hidden_size=32))
    with pytest.raises(CheckpointError, match=r"^checkpoint c iteration 4 does not fit this model "
                                              r"\(\d+ tensors of another shape, e\.g\. .*fc1"):
        ckpt.load_model_state(wider, saved, "checkpoint c iteration 4")
