"""Checkpoint integrity, one process: checksums, fallback, --ckpt-step, pruning, free space."""
import json
import os
import shutil
import subprocess

import pytest
import torch

from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.training import checkpoint_files
from megatron_lsh.training import checkpointing as ckpt
from megatron_lsh.training.checkpointing import CheckpointError, load_checkpoint, save_checkpoint

SINGLE = ProcessGroups.single()
LAYOUT = ckpt.parallel_layout(SINGLE)
MODEL = "mp_rank_00/model_optim_rng.pt"


def state(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "consumed_train_samples": int(value)}


def saved(root, *iterations, **kwargs) -> str:
    for iteration in iterations:
        save_checkpoint(iteration, state(float(iteration)), str(root), SINGLE, **kwargs)
    return str(root)


def model_file(root, iteration):
    return os.path.join(ckpt.iteration_dir(str(root), iteration), MODEL)


def flip_bytes(path, offset_fraction=0.5, count=64):
    """Overwrite ``count`` bytes in the middle of the file (same size, different content)."""
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * offset_fraction))
        chunk = f.read(count)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_metadata_records_size_and_checksum_of_every_file(tmp_path):
    root = saved(tmp_path, 3)
    meta = json.loads((tmp_path / "iter_0000003" / ckpt.METADATA_FILE).read_text())
    record = meta["files"][MODEL]
    assert record["bytes"] == os.path.getsize(model_file(root, 3))
    assert record["sha256"] == checkpoint_files.file_digest(model_file(root, 3))
    assert len(record["sha256"]) == 64


def test_a_flipped_truncated_or_deleted_file_is_named(tmp_path):
    root = saved(tmp_path, 2)
    path = model_file(root, 2)
    good = open(path, "rb").read()
    flip_bytes(path)
    with pytest.raises(CheckpointError, match=rf"^checkpoint file {path} is corrupt: its sha256 "
                                              rf"does not match the one recorded at save$"):
        load_checkpoint(root, SINGLE, expected_layout=LAYOUT)
    with open(path, "wb") as f:
        f.write(good[:len(good) // 2])
    with pytest.raises(CheckpointError, match=rf"^checkpoint file {path} is truncated or altered: "
                                              rf"it has {len(good) // 2} bytes, {len(good)} were "
                                              rf"written at save$"):
        load_checkpoint(root, SINGLE, expected_layout=LAYOUT)
    os.remove(path)
    with pytest.raises(CheckpointError, match=rf"^checkpoint file {path} is missing$"):
        load_checkpoint(root, SINGLE, expected_layout=LAYOUT)


def test_fallback_loads_the_newest_intact_earlier_iteration_and_says_so(tmp_path):
    root = saved(tmp_path, 2, 4, 6)
    flip_bytes(model_file(root, 6))
    os.remove(model_file(root, 4))
    lines = []
    iteration, loaded = load_checkpoint(root, SINGLE, expected_layout=LAYOUT, fallback=True,
                                        log=lines.append)
    assert iteration == 2 and torch.equal(loaded["model"]["w"], torch.full((64, 64), 2.0))
    assert lines == [f"WARNING: loaded iteration 2 instead of 6: checkpoint file "
                     f"{model_file(root, 6)} is corrupt: its sha256 does not match the one "
                     f"recorded at save"]
    # Without the flag the corrupt latest stops the run.
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(root, SINGLE, expected_layout=LAYOUT)


def test_fallback_with_nothing_intact_fails_naming_the_newest_reason(tmp_path):
    root = saved(tmp_path, 1, 2)
    for iteration in (1, 2):
        flip_bytes(model_file(root, iteration))
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*: all 2 iterations "
                                              r"failed to load, the newest \(iteration 2\) because "
                                              r"checkpoint file .* is corrupt"):
        load_checkpoint(root, SINGLE, expected_layout=LAYOUT, fallback=True)


def test_fallback_survives_a_garbled_latest_file(tmp_path):
    root = saved(tmp_path, 1, 5)
    (tmp_path / ckpt.LATEST_FILE).write_text("garbage")
    iteration, _ = load_checkpoint(root, SINGLE, expected_layout=LAYOUT, fallback=True)
    assert iteration == 5


def test_ckpt_step_loads_a_chosen_iteration(tmp_path):
    root = saved(tmp_path, 3, 7)
    iteration, loaded = load_checkpoint(root, SINGLE, expected_layout=LAYOUT, step=3)
    assert iteration == 3 and loaded["consumed_train_samples"] == 3
    with pytest.raises(CheckpointError, match=r"^--ckpt-step points at iteration 5 but folder "
                                              r".*iter_0000005 does not exist$"):
        load_checkpoint(root, SINGLE, expected_layout=LAYOUT, step=5)


def test_keep_last_prunes_older_checkpoints_only(tmp_path):
    root = saved(tmp_path, 1, 2, 3, 4, 5, keep_last=2)
    assert sorted(os.listdir(root)) == ["iter_0000004", "iter_0000005", ckpt.LATEST_FILE]
    # Re-saving an older iteration (a rollback with --ckpt-step): the new latest is never pruned.
    saved(tmp_path, 2, keep_last=1)
    assert ckpt.read_latest(root) == 2
    assert "iter_0000002" in os.listdir(root)
    assert load_checkpoint(root, SINGLE, expected_layout=LAYOUT)[0] == 2


def test_a_crash_while_pruning_leaves_a_folder_the_next_start_removes(tmp_path):
    root = saved(tmp_path, 1, 2)
    os.rename(ckpt.iteration_dir(root, 1), ckpt.iteration_dir(root, 1) + ".del-0a1b2c3d")
    os.makedirs(ckpt.iteration_dir(root, 3) + ".tmp-deadbeef")
    assert load_checkpoint(root, SINGLE, expected_layout=LAYOUT)[0] == 2
    assert sorted(ckpt.clean_stale(root)) == ["iter_0000001.del-0a1b2c3d",
                                              "iter_0000003.tmp-deadbeef"]
    assert sorted(os.listdir(root)) == ["iter_0000002", ckpt.LATEST_FILE]


def test_too_little_free_space_is_one_sentence_before_anything_is_written(tmp_path, monkeypatch):
    root = saved(tmp_path, 1)
    monkeypatch.setattr(checkpoint_files.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 4096))
    with pytest.raises(CheckpointError, match=r"^not enough free space to save a checkpoint in "
                                              r".*: about 1\.0 MiB needed, 0\.0 MiB free$"):
        save_checkpoint(2, state(2.0), root, SINGLE)
    assert sorted(os.listdir(root)) == ["iter_0000001", ckpt.LATEST_FILE]
    assert ckpt.read_latest(root) == 1


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 2 MiB tmpfs (root only): a disk that really fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                                            str(mount)], capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs to fill a real disk")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_filling_up_during_a_save_keeps_the_previous_checkpoint(tiny_tmpfs, monkeypatch):
    root = str(tiny_tmpfs)
    save_checkpoint(1, state(1.0), root, SINGLE)           # 16 KiB of tensors: fits
    monkeypatch.setattr(ckpt, "free_space_problem", lambda folder, needed: None)
    big = {"model": {"w": torch.ones(1024, 1024)}}         # 4 MiB: does not
    with pytest.raises(CheckpointError, match=r"^no space left on the device while writing "
                                              r".*iter_0000002\.tmp-[0-9a-f]+/mp_rank_00/"
                                              r"model_optim_rng\.pt$"):
        save_checkpoint(2, big, root, SINGLE)
    assert sorted(os.listdir(root)) == ["iter_0000001", ckpt.LATEST_FILE]
    assert load_checkpoint(root, SINGLE, expected_layout=LAYOUT)[0] == 1
