"""Checkpoints in Megatron-LM's layout, saved atomically, loaded without running pickled code.

Layout under the save folder::

    latest_checkpointed_iteration.txt      the iteration number of the newest complete save
    iter_0000200/
        megatron_lsh_checkpoint.json       format, iteration, parallel layout, file checksums
                                           (JSON: safe to read; not named metadata.json, which
                                           Megatron-LM reads as its distributed-checkpoint
                                           config)
        mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/
            model_optim_rng.pt             written by the first DP replica of this position
            distrib_optim_dp{dp:03d}.pt    one per DP rank, only for per-DP-rank state (ZeRO-1)

The ``_{pp:03d}`` part appears only when pipeline-model-parallel-size > 1 and ``_{ep:03d}`` only
when expert-model-parallel-size > 1, as in Megatron. A *position* is a (tp, pp, ep) coordinate;
every rank at one position holds the same parameters, so the one with the lowest DP rank writes.

**Atomicity.** A save is collective over all ranks:

1. rank 0 removes what crashed saves left (``iter_*.tmp-*``) and picks a random token that it
   broadcasts, so every rank writes into the same ``iter_XXXXXXX.tmp-<token>`` folder;
2. every rank writes (and fsyncs) its files there; an all-reduce of a success flag is the
   barrier, and turns a failure on one rank into an error on all (no hang);
3. rank 0 renames the folder to ``iter_XXXXXXX`` and only then replaces ``latest`` (temp file +
   ``os.replace``); a final all-reduce makes every rank wait for it.

A crash (even SIGKILL) before step 3 leaves only a temp folder, which loads ignore; a crash
inside step 3 leaves ``latest`` on the previous complete checkpoint. Re-saving an iteration
that already exists moves the old folder to ``iter_XXXXXXX.old-<token>`` for the instant of the
swap; loads and the next save recover it if a crash hits exactly then.

**Integrity.** Every file's size and SHA-256 are recorded in the metadata file at save and
checked at load (:mod:`~megatron_lsh.training.checkpoint_files`); a mismatch names the file.
``fallback=True`` (``--load-fallback``) then loads the newest intact earlier iteration and says
so in one line; ``step`` (``--ckpt-step``) loads a chosen iteration instead of ``latest``;
``keep_last`` (``--keep-last-n-checkpoints``) prunes older folders after a successful save. A
save checks free space first. When a save or load fails, every rank raises the same
:class:`CheckpointError` (the first failing rank's sentence), so rank 0 can speak for all.

**Loading** uses ``torch.load(weights_only=True)``: a file holding anything but tensors and
plain python values is refused rather than unpickled. Saves check this up front and name the
offending entry. The state a training loop passes usually has ``model``, ``optimizer``,
``opt_param_scheduler``, ``loss_scaler``, ``rng_state``, ``consumed_train_samples`` and
``config`` (a plain dict); this module adds ``megatron_lsh_format``, ``iteration`` and
``parallel_layout``. (Not ``checkpoint_version``: Megatron-LM's loader reads that key as the
version of *its* state-dict layout; a converted checkpoint for Megatron writes its own.)

**Another layout.** A checkpoint saved with other TP / PP / EP / DP sizes (or with ZeRO-1
switched) loads by resharding (:mod:`~megatron_lsh.training.reshard`): the state returned
then holds the layout-free entries and ``reshard_from`` (the folder) for the caller to rebuild
its model and optimizer from. Model shape entries of the layout (``num_experts``, ...) must
match. RNG states differ per rank, so the ``rng_state`` entry is gathered over the
data-parallel group on save (Megatron does the same) and each rank gets its own back on load.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.training.checkpoint_files import (
    LATEST_FILE, MODEL_FILE, CheckpointError, clean_stale, free_space_problem, fsync_dir,
    gather_problems as _gather_problems, iteration_dir, prune, raise_first as _raise_first,
    read_latest, safe_load, saved_iterations, tensor_bytes, write_file, write_text_atomically)

__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "FORMAT_KEY", "LATEST_FILE", "METADATA_FILE",
           "MODEL_FILE", "RESHARDABLE", "clean_stale", "distrib_optim_file",
           "is_checkpoint_writer", "is_compressor_state", "iteration_dir", "load_checkpoint",
           "load_model_state", "no_checkpoint_warning", "parallel_layout", "rank_dir",
           "rank_dir_name", "read_latest", "read_metadata", "save_checkpoint"]

CHECKPOINT_VERSION = 2
"""Format version (``megatron_lsh_format``) of every checkpoint; loads refuse newer ones.
1: metadata in ``metadata.json`` and the version under ``checkpoint_version`` (still read)."""
FORMAT_KEY = "megatron_lsh_format"
LEGACY_FORMAT_KEY = "checkpoint_version"
METADATA_FILE = "megatron_lsh_checkpoint.json"
LEGACY_METADATA_FILE = "metadata.json"
RESHARDABLE = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
               "expert_model_parallel_size", "data_parallel_size", "use_distributed_optimizer")
"""Layout entries a load may change (by resharding); the others describe the model."""
_RNG_PER_DP = "rng_state_per_data_parallel_rank"
_PLAIN_LEAVES = (str, int, float, bool, bytes, type(None), torch.Tensor, torch.nn.Parameter,
                 torch.Size, torch.dtype, torch.device)


# ---------------------------------------------------------------------------------------------
# Names and layout
# ---------------------------------------------------------------------------------------------

def rank_dir_name(tp_rank: int, pp_rank: int, ep_rank: int, *, pp_size: int, ep_size: int) -> str:
    """Megatron's per-position folder name: ``mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]``."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return name


def _position_name(groups: ProcessGroups) -> str:
    return rank_dir_name(groups.tp_rank, groups.pp_rank, groups.ep_rank,
                         pp_size=groups.pp_size, ep_size=groups.ep_size)


def rank_dir(root: str, iteration: int, groups: ProcessGroups) -> str:
    """Folder of this rank's position inside the checkpoint of ``iteration``."""
    return os.path.join(iteration_dir(root, iteration), _position_name(groups))


def distrib_optim_file(dp_rank: int) -> str:
    """File name of one DP rank's share of per-DP-rank state."""
    return f"distrib_optim_dp{dp_rank:03d}.pt"


def is_checkpoint_writer(groups: ProcessGroups) -> bool:
    """True on the lowest DP rank among the ranks at this rank's (tp, pp, ep) position."""
    tp, ep = groups.tp_size, groups.ep_size
    position = (groups.tp_rank, groups.ep_rank)
    return all(((d * tp + groups.tp_rank) % ep) != position[1] for d in range(groups.dp_rank))


def parallel_layout(groups: ProcessGroups, **extra: Any) -> dict:
    """The layout a checkpoint is tied to: tp, pp, ep, dp sizes plus e.g. ``num_experts=16``."""
    layout = {"tensor_model_parallel_size": groups.tp_size,
              "pipeline_model_parallel_size": groups.pp_size,
              "expert_model_parallel_size": groups.ep_size,
              "data_parallel_size": groups.dp_size}
    layout.update(extra)
    return layout


def no_checkpoint_warning(load_dir: str) -> str:
    """What the caller prints when :func:`load_checkpoint` finds nothing to load."""
    return (f"WARNING: no checkpoint found in {load_dir} (no {LATEST_FILE}); "
            f"training starts from scratch")


# ---------------------------------------------------------------------------------------------
# Collectives (no-ops in a one-process run)
# ---------------------------------------------------------------------------------------------

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank; also a barrier."""
    if not _distributed():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _agree_token() -> str:
    """A random hex token, the same on every rank (rank 0 draws it)."""
    token = torch.tensor([secrets.randbits(31)], dtype=torch.int64)
    if _distributed():
        token = token.to(_device())
        dist.broadcast(token, src=0)
    return f"{int(token.item()):08x}"


def _gather_over_dp(value: Any, groups: ProcessGroups) -> list:
    """``value`` of every DP rank of this rank's DP group, in DP-rank order."""
    if groups.dp_size == 1 or groups.dp is None:
        return [value]
    out: list = [None] * groups.dp_size
    dist.all_gather_object(out, value, group=groups.dp)
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def _check_plain(value: Any, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` could not read back, naming the entry."""
    kind = type(value)
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
    elif kind in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif kind not in _PLAIN_LEAVES:
        raise CheckpointError(f"{where} is a {kind.__module__}.{kind.__qualname__}, which "
                              f"torch.load(weights_only=True) cannot read back; store it as a "
                              f"tensor or plain python values")


def _problem(error: BaseException, doing: str) -> str:
    if isinstance(error, CheckpointError):
        return str(error)
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{doing} failed: {reason}"


def _publish(root: str, tmp: str, final: str, iteration: int, token: str,
             on_stage: Optional[Callable[[str, str], None]]) -> None:
    """Rank 0: move the complete temp folder into place, then point ``latest`` at it."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{token}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    if on_stage is not None:
        on_stage("renamed", final)
    write_text_atomically(os.path.join(root, LATEST_FILE), f"{iteration}\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------

def save_checkpoint(iteration: int, state: dict, save_dir: str, groups: ProcessGroups, *,
                    per_dp_rank_state: Optional[dict] = None, layout: Optional[dict] = None,
                    keep_last: Optional[int] = None,
                    on_stage: Optional[Callable[[str, str], None]] = None) -> str:
    """Save ``state`` for ``iteration`` under ``save_dir``; collective over all ranks.

    ``state`` is this rank's (see the module docstring for the usual keys; its ``rng_state`` is
    gathered over DP). ``per_dp_rank_state``, when given, is written by every rank to its own
    ``distrib_optim_dp{dp:03d}.pt``. ``layout`` defaults to :func:`parallel_layout` of
    ``groups``; pass extra entries (e.g. ``num_experts``) to have loads check them too.
    ``keep_last``: after the save, delete all but the newest ``keep_last`` checkpoints.
    ``on_stage(stage, path)`` is called after each file (``"file"``), after this rank's files
    (``"written"``, before the barrier that lets rank 0 publish) and, on rank 0, after the
    rename (``"renamed"``): for progress and crash tests. Returns the final folder of the
    checkpoint.
    """
    if iteration < 0:
        raise CheckpointError(f"checkpoint iteration must be non-negative, got {iteration}")
    layout = parallel_layout(groups) if layout is None else dict(layout)
    is_rank0 = not _distributed() or dist.get_rank() == 0
    setup_error = None
    if is_rank0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            clean_stale(save_dir)
        except OSError as error:
            setup_error = error
    if not _all_ok(setup_error is None):
        raise CheckpointError(f"cannot prepare checkpoint folder {save_dir}: {setup_error}"
                              if setup_error else f"rank 0 could not prepare checkpoint folder "
                              f"{save_dir}") from setup_error
    token = _agree_token()
    final = iteration_dir(save_dir, iteration)
    tmp = f"{final}.tmp-{token}"
    payload = dict(state)
    if "rng_state" in payload:
        payload["rng_state"] = {_RNG_PER_DP: _gather_over_dp(payload["rng_state"], groups)}
    payload.update({FORMAT_KEY: CHECKPOINT_VERSION, "iteration": iteration,
                    "parallel_layout": layout})

    problem, records = None, {}
    try:
        _check_plain(payload, "checkpoint state")
        if per_dp_rank_state is not None:
            _check_plain(per_dp_rank_state, "per-DP-rank checkpoint state")
        position = _position_name(groups)
        files = []
        if is_checkpoint_writer(groups):
            files.append((f"{position}/{MODEL_FILE}", payload))
        if per_dp_rank_state is not None:
            files.append((f"{position}/{distrib_optim_file(groups.dp_rank)}", per_dp_rank_state))
        problem = free_space_problem(save_dir, sum(tensor_bytes(obj) for _, obj in files))
        for name, obj in files if problem is None else ():
            path = os.path.join(tmp, name)
            records[name] = write_file(path, obj)
            if on_stage is not None:
                on_stage("file", path)
        if on_stage is not None and problem is None:
            on_stage("written", tmp)
    except Exception as caught:  # noqa: BLE001 - must reach the collective, or the others hang
        problem = _problem(caught, f"saving checkpoint {final}")
    statuses = _gather_problems(problem, records)
    if any(p for p, _ in statuses):
        if is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        _all_ok(True)   # every rank raises only once no partial folder is left
        _raise_first(statuses, f"saving checkpoint {final}")

    problem = None
    if is_rank0:
        try:
            metadata = {FORMAT_KEY: CHECKPOINT_VERSION, "iteration": iteration,
                        "parallel_layout": layout,
                        "per_dp_rank_state": per_dp_rank_state is not None,
                        "files": {name: record for _, recs in statuses
                                  for name, record in sorted(recs.items())}}
            os.makedirs(tmp, exist_ok=True)
            write_text_atomically(os.path.join(tmp, METADATA_FILE),
                                  json.dumps(metadata, indent=1, sort_keys=True))
            _publish(save_dir, tmp, final, iteration, token, on_stage)
            if keep_last:
                prune(save_dir, keep_last, protect=[iteration])
        except Exception as caught:  # noqa: BLE001
            shutil.rmtree(tmp, ignore_errors=True)
            problem = _problem(caught, f"publishing checkpoint {final}")
    _raise_first(_gather_problems(problem), f"publishing checkpoint {final}")
    return final


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------

def _describe(layout: dict, keys) -> str:
    return ", ".join(f"{key.replace('_', '-')}={layout.get(key, 'absent')}" for key in keys)


def _saved(saved: dict, key: str) -> Any:
    # Checkpoints from before ZeRO-1 was part of the layout were saved without it.
    return saved.get(key, False if key == "use_distributed_optimizer" else "absent")


def _check_layout(where: str, saved: dict, expected: dict) -> bool:
    """True when ``saved`` is ``expected``; False when only reshardable sizes differ (the load
    reshards); CheckpointError when the model itself differs."""
    differing = [key for key in expected if _saved(saved, key) != expected[key]]
    model = [key for key in differing if key not in RESHARDABLE]
    if model:
        raise CheckpointError(f"checkpoint {where} was saved for another model: "
                              f"{_describe(saved, model)}, this run has "
                              f"{_describe(expected, model)}")
    return not differing


def read_metadata(folder: str) -> dict:
    """The metadata of a checkpoint folder ({} when it has none, e.g. written by a tool)."""
    for name in (METADATA_FILE, LEGACY_METADATA_FILE):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    metadata = json.load(f)
                if not isinstance(metadata, dict) or not isinstance(
                        metadata.get("parallel_layout", {}), dict):
                    raise ValueError("not a JSON object with a parallel_layout")
                return metadata
            except (ValueError, UnicodeDecodeError) as error:
                raise CheckpointError(f"checkpoint metadata {path} is unreadable: "
                                      f"{error}") from error
    return {}


def _checkpoint_folder(load_dir: str, iteration: int, named_by: str) -> str:
    folder = iteration_dir(load_dir, iteration)
    if iteration == 0 and not os.path.isdir(folder) and os.path.isdir(
            os.path.join(load_dir, "release")):
        return os.path.join(load_dir, "release")
    if not os.path.isdir(folder):
        # A crash in the middle of re-saving this iteration leaves it under an .old- name.
        olds = sorted(n for n in os.listdir(load_dir)
                      if n.startswith(os.path.basename(folder) + ".old-"))
        if olds:
            return os.path.join(load_dir, olds[-1])
        raise CheckpointError(f"{named_by} points at iteration {iteration} but folder {folder} "
                              f"does not exist")
    return folder


def _candidates(load_dir: str, step: Optional[int], fallback: bool) -> list:
    """Iterations to try, best first; empty when ``load_dir`` holds no checkpoint at all."""
    if step is not None:
        return [step]
    if not os.path.isdir(load_dir):
        return []
    try:
        latest = read_latest(load_dir)
    except CheckpointError:
        if not fallback:
            raise
        latest = None
    older = saved_iterations(load_dir)
    if latest is None:
        if older and not fallback:
            raise CheckpointError(f"{load_dir} holds checkpoint folders but no {LATEST_FILE}; "
                                  f"write the iteration to load into that file, or pass "
                                  f"--load-fallback to load the newest")
        return sorted(older, reverse=True)
    if not fallback:
        return [latest]
    return [latest] + sorted((i for i in older if i < latest), reverse=True)


def _load_local(load_dir: str, iteration: int, groups: ProcessGroups, expected_layout: dict,
                map_location: Any, named_by: str) -> dict:
    folder = _checkpoint_folder(load_dir, iteration, named_by)
    metadata = read_metadata(folder)
    metadata_path = os.path.join(folder, METADATA_FILE)
    if metadata and not _check_layout(folder, metadata.get("parallel_layout", {}),
                                      expected_layout):
        return _reshard_state(folder, metadata["parallel_layout"])
    records = metadata.get("files")
    position = _position_name(groups)

    def load(name: str) -> Any:
        record = None
        if isinstance(records, dict):
            record = records.get(name)
            if record is None:
                raise CheckpointError(f"checkpoint file {os.path.join(folder, name)} is not "
                                      f"listed in {metadata_path}")
        return safe_load(os.path.join(folder, name), map_location, record)

    state = load(f"{position}/{MODEL_FILE}")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {os.path.join(folder, position, MODEL_FILE)} "
                              f"does not hold a dict")
    _check_version(folder, state)
    if not _check_layout(folder, state.get("parallel_layout", {}), expected_layout):
        return _reshard_state(folder, state.get("parallel_layout", {}))
    rng = state.get("rng_state")
    if isinstance(rng, dict) and set(rng) == {_RNG_PER_DP}:
        if len(rng[_RNG_PER_DP]) != groups.dp_size:
            raise CheckpointError(f"checkpoint {folder} holds the RNG states of "
                                  f"{len(rng[_RNG_PER_DP])} data-parallel ranks but this run has "
                                  f"{groups.dp_size}")
        state["rng_state"] = rng[_RNG_PER_DP][groups.dp_rank]
    per_dp = f"{position}/{distrib_optim_file(groups.dp_rank)}"
    if metadata.get("per_dp_rank_state") or os.path.isfile(os.path.join(folder, per_dp)):
        state["per_dp_rank_state"] = load(per_dp)
    return state


def _check_version(folder: str, state: dict) -> None:
    version = state.get(FORMAT_KEY, state.get(LEGACY_FORMAT_KEY, 0))
    if not isinstance(version, (int, float)) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {folder} has format version {version}, newer than "
                              f"this code's {CHECKPOINT_VERSION}")


def _reshard_state(folder: str, layout: dict) -> dict:
    """What a load into another layout returns: the layout-free entries of the first shard's
    file (iteration, samples, schedule, config), ``reshard_from`` (a
    :class:`~megatron_lsh.training.reshard.SourceCheckpoint`) and ``saved_layout``."""
    from megatron_lsh.training.reshard import SourceCheckpoint
    source = SourceCheckpoint(folder, read_metadata(folder), layout)
    first = source.model_file(min(source.positions))
    _check_version(folder, first)
    keep = ("iteration", "consumed_samples", "opt_param_scheduler", "config", "model_kind",
            "task_state", FORMAT_KEY)
    state = {key: first[key] for key in keep if key in first}
    state.update(reshard_from=source, saved_layout=layout)
    return state


def load_checkpoint(load_dir: str, groups: ProcessGroups, *, expected_layout: dict,
                    map_location: Any = "cpu", step: Optional[int] = None,
                    fallback: bool = False,
                    log: Optional[Callable[[str], None]] = None) -> Optional[tuple[int, dict]]:
    """Load the checkpoint ``latest`` points at: ``(iteration, state)``, or None if there is none.

    None means ``load_dir`` does not exist or holds no checkpoint at all (the caller prints
    :func:`no_checkpoint_warning` and starts from scratch). ``step`` loads that iteration
    instead. A garbled ``latest``, a missing folder or rank file, a file whose size or checksum
    differs from the ones recorded at save, a file that would run code when unpickled, or a
    checkpoint saved with a different ``expected_layout`` (see :func:`parallel_layout`) raise
    :class:`CheckpointError`, unless ``fallback``: then the newest earlier iteration that loads
    cleanly is used, and ``log`` gets one line saying which and why. A checkpoint of another
    layout (only :data:`RESHARDABLE` entries differ) returns the state for resharding (see the
    module docstring). ``state["rng_state"]`` is
    this rank's own; ``state["per_dp_rank_state"]`` is present when the save had per-DP-rank
    state. Collective: every rank loads the same iteration, or every rank raises.
    """
    problem, candidates = None, []
    try:
        candidates = _candidates(load_dir, step, fallback)
    except Exception as caught:  # noqa: BLE001 - must reach the collective, or the others hang
        problem = _problem(caught, f"loading the checkpoint from {load_dir}")
    statuses = _gather_problems(problem, candidates)
    _raise_first(statuses, f"loading the checkpoint from {load_dir}")
    candidates = statuses[0][1]   # rank 0's view decides, should the filesystems disagree
    skipped = []
    for iteration in candidates:
        problem, state = None, None
        try:
            named_by = (os.path.join(load_dir, LATEST_FILE) if step is None and not skipped
                        else "--ckpt-step" if step is not None else "the fallback")
            state = _load_local(load_dir, iteration, groups, expected_layout, map_location,
                                named_by)
        except Exception as caught:  # noqa: BLE001
            problem = _problem(caught, f"loading checkpoint iteration {iteration}")
        statuses = _gather_problems(problem)
        failed = next((p for p, _ in statuses if p), None)
        if failed is None:
            if skipped and log is not None:
                log(f"WARNING: loaded iteration {iteration} instead of {skipped[0][0]}: "
                    f"{skipped[0][1]}")
            return iteration, state
        skipped.append((iteration, failed))
        if not fallback:
            _raise_first(statuses, f"loading checkpoint iteration {iteration}")
    if skipped:
        error = CheckpointError(f"no intact checkpoint in {load_dir}: all {len(skipped)} "
                                f"iterations failed to load, the newest (iteration "
                                f"{skipped[0][0]}) because {skipped[0][1]}")
        error.all_ranks = True
        raise error
    return None


def is_compressor_state(name: str) -> bool:
    """True for an all-to-all compressor's tensors (LSH rotations, sketch): derived from seeds,
    not trained, so a model built with another compressor (or another LSH setting) may lack
    them or shape them differently."""
    return ".compressor." in name


def load_model_state(model: torch.nn.Module, saved: dict, where: str,
                     log: Optional[Callable[[str], None]] = None) -> None:
    """Load ``saved`` (a checkpoint's model state) into ``model``, tolerating a changed
    all-to-all compressor: its tensors that are missing, extra or differently shaped keep the
    model's own (seeded) values, said in one line. Any other mismatch is one CheckpointError
    naming ``where`` and the first differing tensors."""
    own = model.state_dict()
    extra = [n for n in saved if n not in own]
    missing = [n for n in own if n not in saved]
    reshaped = [n for n in own if n in saved and hasattr(saved[n], "shape")
                and tuple(saved[n].shape) != tuple(own[n].shape)]
    bad = {desc: [n for n in names if not is_compressor_state(n)] for desc, names in
           (("not in this model", extra), ("missing from it", missing),
            ("of another shape", reshaped))}
    if any(bad.values()):
        kinds = ", ".join(f"{len(names)} tensors {desc}" for desc, names in bad.items() if names)
        example = [n for names in bad.values() for n in names][:3]
        raise CheckpointError(f"{where} does not fit this model ({kinds}, e.g. "
                              f"{', '.join(example)}): was it saved with other model flags?")
    kept = set(extra) | set(reshaped)
    model.load_state_dict({n: t for n, t in saved.items() if n not in kept}, strict=False)
    if (extra or missing or reshaped) and log is not None:
        log(f"> the all-to-all compressor's state differs from the checkpoint's ({len(extra)} "
            f"tensors dropped, {len(missing) + len(reshaped)} kept as initialised): the "
            f"compressor was changed")
