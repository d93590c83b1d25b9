"""Checkpoints on 4 gloo ranks: tp x pp and expert-parallel layouts, RNG per rank, SIGKILL mid-save."""
import os
import signal

import pytest
import torch

from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups
from megatron_lsh.parallel.spawn import WorkerError, run_distributed
from megatron_lsh.training import checkpointing as ckpt


def _state(groups, iteration):
    """Dense weights differ per (tp, pp), experts per ep rank, RNG per rank."""
    dense = torch.full((3,), 100.0 * groups.pp_rank + 10.0 * groups.tp_rank + iteration)
    experts = torch.full((2,), 1000.0 * groups.ep_rank + iteration)
    return {"model": {"dense": dense, "experts": experts},
            "rng_state": {"torch": torch.tensor([groups.rank, iteration])},
            "consumed_train_samples": 8 * iteration}


def _round_trip(groups, root, iteration, with_shards):
    shard = {"exp_avg": torch.full((2,), float(groups.rank))} if with_shards else None
    save = ckpt.save_checkpoint(iteration, _state(groups, iteration), root, groups,
                                per_dp_rank_state=shard,
                                layout=ckpt.parallel_layout(groups, num_experts=8))
    loaded_iteration, state = ckpt.load_checkpoint(
        root, groups, expected_layout=ckpt.parallel_layout(groups, num_experts=8))
    expected = _state(groups, iteration)
    assert loaded_iteration == iteration
    assert torch.equal(state["model"]["dense"], expected["model"]["dense"])
    assert torch.equal(state["model"]["experts"], expected["model"]["experts"])
    assert torch.equal(state["rng_state"]["torch"], expected["rng_state"]["torch"])  # own RNG
    if with_shards:
        assert torch.equal(state["per_dp_rank_state"]["exp_avg"], shard["exp_avg"])
    return sorted(os.listdir(save)), sorted(os.listdir(ckpt.rank_dir(root, iteration, groups)))


def _layouts(rank, world, root):
    out = {}
    for name, (tp, pp, ep), shards in (("tp2pp2", (2, 2, 1), False), ("ep4", (1, 1, 4), True),
                                       ("ep2", (1, 1, 2), True)):
        groups = ProcessGroups.build(ParallelDims(world, tp=tp, pp=pp, ep=ep))
        out[name] = _round_trip(groups, os.path.join(root, name), 5, shards)
    # The ep4 layout loads the tp2pp2 checkpoint for resharding (training/reshard.py), but
    # not as a model with other shape entries.
    groups = ProcessGroups.build(ParallelDims(world, ep=4))
    _, state = ckpt.load_checkpoint(os.path.join(root, "tp2pp2"), groups,
                                    expected_layout=ckpt.parallel_layout(groups, num_experts=8))
    out["reshard"] = (sorted(state["reshard_from"].positions), state["saved_layout"])
    try:
        ckpt.load_checkpoint(os.path.join(root, "tp2pp2"), groups,
                             expected_layout=ckpt.parallel_layout(groups, num_experts=16))
    except ckpt.CheckpointError as error:
        out["refused"] = str(error)
    return out


META = "megatron_lsh_checkpoint.json"


def test_layouts_round_trip_on_four_ranks(tmp_path):
    results = run_distributed(_layouts, 4, str(tmp_path), timeout=120)
    top, _ = results[0]["tp2pp2"]
    assert top == [META, "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert all(r["tp2pp2"][1] == ["model_optim_rng.pt"] for r in results)
    # ep=4 over dp=4: every rank is the only one at its position and writes its shard there.
    assert results[0]["ep4"][0] == [META, "mp_rank_00_000", "mp_rank_00_001", "mp_rank_00_002",
                                    "mp_rank_00_003"]
    assert [r["ep4"][1] for r in results] == [
        ["distrib_optim_dp%03d.pt" % d, "model_optim_rng.pt"] for d in range(4)]
    # ep=2 over dp=4: dp 0 and 2 share mp_rank_00_000, dp 1 and 3 share mp_rank_00_001.
    assert results[0]["ep2"][0] == [META, "mp_rank_00_000", "mp_rank_00_001"]
    assert results[2]["ep2"][1] == ["distrib_optim_dp000.pt", "distrib_optim_dp002.pt",
                                    "model_optim_rng.pt"]
    positions, saved = results[0]["reshard"]
    assert positions == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
    assert (saved["tensor_model_parallel_size"], saved["pipeline_model_parallel_size"]) == (2, 2)
    assert all(r["reshard"] == results[0]["reshard"] for r in results)
    assert all(r["refused"].endswith("was saved for another model: num-experts=8, this run has "
                                     "num-experts=16") for r in results)


def _save_then_crash(rank, world, root):
    groups = ProcessGroups.build(ParallelDims(world, tp=2, pp=2))
    ckpt.save_checkpoint(1, _state(groups, 1), root, groups)

    def on_stage(stage, path):
        if stage == "written" and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 1 dies with its file written

    ckpt.save_checkpoint(2, _state(groups, 2), root, groups, on_stage=on_stage)


def _resume(rank, world, root):
    groups = ProcessGroups.build(ParallelDims(world, tp=2, pp=2))
    layout = ckpt.parallel_layout(groups)
    iteration, state = ckpt.load_checkpoint(root, groups, expected_layout=layout)
    first = (iteration, state["model"]["dense"].tolist(), state["rng_state"]["torch"].tolist())
    ckpt.save_checkpoint(2, _state(groups, 2), root, groups)
    iteration, state = ckpt.load_checkpoint(root, groups, expected_layout=layout)
    return first, iteration, sorted(os.listdir(root))


def test_sigkill_of_one_rank_mid_save_keeps_the_previous_checkpoint(tmp_path):
    root = str(tmp_path / "ckpt")
    with pytest.raises(WorkerError, match=r"rank \d of 4 failed"):  # 1, or a peer it left
        run_distributed(_save_then_crash, 4, root, timeout=120)
    assert ckpt.read_latest(root) == 1
    assert any(name.startswith("iter_0000002.tmp-") for name in os.listdir(root))
    results = run_distributed(_resume, 4, root, timeout=120)
    for rank, (first, iteration, listing) in enumerate(results):
        tp, pp = rank % 2, rank // 2
        assert first == (1, [100.0 * pp + 10.0 * tp + 1] * 3, [rank, 1])
        assert iteration == 2
        assert listing == ["iter_0000001", "iter_0000002", ckpt.LATEST_FILE]


def _one_rank_short_of_space(rank, world, root):
    import shutil
    from megatron_lsh.training import checkpoint_files
    groups = ProcessGroups.build(ParallelDims(world, tp=2))
    ckpt.save_checkpoint(1, _state(groups, 1), root, groups)
    if rank == 1:   # rank 1 writes to a filesystem that is full
        full = shutil._ntuple_diskusage(1 << 30, 1 << 30, 0)
        checkpoint_files.shutil.disk_usage = lambda path: full
    try:
        ckpt.save_checkpoint(2, _state(groups, 2), root, groups)
    except ckpt.CheckpointError as error:
        return str(error), getattr(error, "all_ranks", False), sorted(os.listdir(root))
    return None


def test_one_rank_failing_a_save_is_the_same_sentence_on_every_rank(tmp_path):
    root = str(tmp_path / "ckpt")
    results = run_distributed(_one_rank_short_of_space, 2, root, timeout=120)
    message = (f"not enough free space to save a checkpoint in {root}: about 1.0 MiB needed, "
               f"0.0 MiB free (rank 1; 1 of 2 ranks failed)")
    assert results == [(message, True, ["iter_0000001", ckpt.LATEST_FILE])] * 2


def _fallback_when_one_position_is_corrupt(rank, world, root):
    groups = ProcessGroups.build(ParallelDims(world, tp=2))
    for iteration in (1, 2):
        ckpt.save_checkpoint(iteration, _state(groups, iteration), root, groups)
    if rank == 0:   # only the tp-rank-1 file of iteration 2 rots
        path = os.path.join(ckpt.iteration_dir(root, 2), "mp_rank_01", ckpt.MODEL_FILE)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(b"\x00" * 16)
    torch.distributed.barrier()
    lines = []
    iteration, state = ckpt.load_checkpoint(root, groups, expected_layout=ckpt.parallel_layout(
        groups), fallback=True, log=lines.append)
    return iteration, state["model"]["dense"].tolist(), lines


def test_fallback_is_collective_when_one_rank_file_is_corrupt(tmp_path):
    root = str(tmp_path / "ckpt")
    results = run_distributed(_fallback_when_one_position_is_corrupt, 2, root, timeout=120)
    for rank, (iteration, dense, lines) in enumerate(results):
        assert iteration == 1 and dense == [10.0 * rank + 1] * 3
        assert len(lines) == 1 and lines[0].startswith("WARNING: loaded iteration 1 instead of 2: "
                                                       "checkpoint file ")
        assert "mp_rank_01/model_optim_rng.pt is corrupt" in lines[0]
