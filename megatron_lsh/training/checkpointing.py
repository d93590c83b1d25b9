"""Checkpoints in Megatron-LM's layout, saved atomically, loaded without running pickled code.

Layout under the save folder::

    latest_checkpointed_iteration.txt      the iteration number of the newest complete save
    iter_0000200/
        metadata.json                      version, iteration, parallel layout (JSON: safe to read)
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

**Loading** uses ``torch.load(weights_only=True)``: a file holding anything but tensors and
plain python values is refused rather than unpickled. Saves check this up front and name the
offending entry. The state a training loop passes usually has ``model``, ``optimizer``,
``opt_param_scheduler``, ``loss_scaler``, ``rng_state``, ``consumed_train_samples`` and
``config`` (a plain dict); this module adds ``checkpoint_version``, ``iteration`` and
``parallel_layout``. RNG states differ per rank, so the ``rng_state`` entry is gathered over the
data-parallel group on save (Megatron does the same) and each rank gets its own back on load.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import shutil
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_lsh.parallel.dims import ProcessGroups

CHECKPOINT_VERSION = 1
"""Format version written into every checkpoint; loads refuse newer ones."""
LATEST_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
METADATA_FILE = "metadata.json"
_RNG_PER_DP = "rng_state_per_data_parallel_rank"
_STALE = re.compile(r"^(iter_\d{7})\.(tmp|old)-[0-9a-f]+$")
_PLAIN_LEAVES = (str, int, float, bool, bytes, type(None), torch.Tensor, torch.nn.Parameter,
                 torch.Size, torch.dtype, torch.device)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names the file or folder."""


# ---------------------------------------------------------------------------------------------
# Names and layout
# ---------------------------------------------------------------------------------------------

def iteration_dir(root: str, iteration: int) -> str:
    """``{root}/iter_{iteration:07d}``."""
    return os.path.join(root, f"iter_{iteration:07d}")


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


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on folders
    finally:
        os.close(fd)


def _write_file(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _safe_load(path: str, map_location: Any) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        culprit = f" (it refers to {found.group(1)})" if found else ""
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and "
                              f"plain python values{culprit}, and unpickling them could run "
                              f"code") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint file {path}: {reason}") from error


def read_latest(root: str) -> Optional[int]:
    """The iteration in ``{root}/latest_checkpointed_iteration.txt``; None if there is no file.

    Megatron's ``release`` marker reads as iteration 0 (folder ``release``).
    """
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if text == "release":
        return 0
    if not text.isdigit():
        raise CheckpointError(f"{path} should hold an iteration number but holds {text[:40]!r}")
    return int(text)


def _clean_stale(root: str) -> None:
    """Remove temp folders of crashed saves; put back an old folder a crashed swap left."""
    for name in sorted(os.listdir(root)):
        match = _STALE.match(name)
        if not match:
            continue
        path, final = os.path.join(root, name), os.path.join(root, match.group(1))
        if match.group(2) == "old" and not os.path.exists(final):
            os.rename(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _publish(root: str, tmp: str, final: str, iteration: int, token: str,
             on_stage: Optional[Callable[[str, str], None]]) -> None:
    """Rank 0: move the complete temp folder into place, then point ``latest`` at it."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{token}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    if on_stage is not None:
        on_stage("renamed", final)
    _write_text_atomically(os.path.join(root, LATEST_FILE), f"{iteration}\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------

def save_checkpoint(iteration: int, state: dict, save_dir: str, groups: ProcessGroups, *,
                    per_dp_rank_state: Optional[dict] = None, layout: Optional[dict] = None,
                    on_stage: Optional[Callable[[str, str], None]] = None) -> str:
    """Save ``state`` for ``iteration`` under ``save_dir``; collective over all ranks.

    ``state`` is this rank's (see the module docstring for the usual keys; its ``rng_state`` is
    gathered over DP). ``per_dp_rank_state``, when given, is written by every rank to its own
    ``distrib_optim_dp{dp:03d}.pt``. ``layout`` defaults to :func:`parallel_layout` of
    ``groups``; pass extra entries (e.g. ``num_experts``) to have loads check them too.
    ``on_stage(stage, path)`` is called after each file (``"file"``), after this rank's files
    (``"written"``) and, on rank 0, after the rename (``"renamed"``): for progress and crash
    tests. Returns the final folder of the checkpoint.
    """
    if iteration < 0:
        raise CheckpointError(f"checkpoint iteration must be non-negative, got {iteration}")
    layout = parallel_layout(groups) if layout is None else dict(layout)
    is_rank0 = not _distributed() or dist.get_rank() == 0
    setup_error = None
    if is_rank0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            _clean_stale(save_dir)
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
    payload.update(checkpoint_version=CHECKPOINT_VERSION, iteration=iteration,
                   parallel_layout=layout)

    error: Optional[BaseException] = None
    try:
        _check_plain(payload, "checkpoint state")
        if per_dp_rank_state is not None:
            _check_plain(per_dp_rank_state, "per-DP-rank checkpoint state")
        position = os.path.join(tmp, _position_name(groups))
        files = []
        if is_checkpoint_writer(groups):
            files.append((os.path.join(position, MODEL_FILE), payload))
        if per_dp_rank_state is not None:
            files.append((os.path.join(position, distrib_optim_file(groups.dp_rank)),
                          per_dp_rank_state))
        for path, obj in files:
            _write_file(path, obj)
            if on_stage is not None:
                on_stage("file", path)
        if is_rank0:
            metadata = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                        "parallel_layout": layout,
                        "per_dp_rank_state": per_dp_rank_state is not None}
            os.makedirs(tmp, exist_ok=True)
            _write_text_atomically(os.path.join(tmp, METADATA_FILE),
                                   json.dumps(metadata, indent=1, sort_keys=True))
        if on_stage is not None:
            on_stage("written", tmp)
    except Exception as caught:  # noqa: BLE001 - must reach the all-reduce, or the others hang
        error = caught
    if not _all_ok(error is None):
        if is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, CheckpointError):
            raise error
        raise CheckpointError(f"saving checkpoint {final} failed"
                              + (f": {error}" if error else " on another rank")) from error

    if is_rank0:
        try:
            _publish(save_dir, tmp, final, iteration, token, on_stage)
        except Exception as caught:  # noqa: BLE001
            error = caught
    if not _all_ok(error is None):
        raise CheckpointError(f"publishing checkpoint {final} failed"
                              + (f": {error}" if error else " on rank 0")) from error
    return final


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------

def _describe(layout: dict, keys) -> str:
    return ", ".join(f"{key.replace('_', '-')}={layout.get(key, 'absent')}" for key in keys)


def _check_layout(where: str, saved: dict, expected: dict) -> None:
    differing = [key for key in expected if saved.get(key, "absent") != expected[key]]
    if differing:
        raise CheckpointError(f"checkpoint {where} was saved with {_describe(saved, differing)} "
                              f"but this run has {_describe(expected, differing)}; loading into "
                              f"a different parallel layout is not supported yet")


def _checkpoint_folder(load_dir: str, iteration: int) -> str:
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
        raise CheckpointError(f"{os.path.join(load_dir, LATEST_FILE)} points at iteration "
                              f"{iteration} but folder {folder} does not exist")
    return folder


def _load_local(load_dir: str, groups: ProcessGroups, expected_layout: dict,
                map_location: Any) -> Optional[tuple[int, dict]]:
    if not os.path.isdir(load_dir):
        return None
    iteration = read_latest(load_dir)
    if iteration is None:
        if any(n.startswith("iter_") and not _STALE.match(n) for n in os.listdir(load_dir)):
            raise CheckpointError(f"{load_dir} holds checkpoint folders but no {LATEST_FILE}; "
                                  f"write the iteration to load into that file")
        return None
    folder = _checkpoint_folder(load_dir, iteration)
    metadata_path = os.path.join(folder, METADATA_FILE)
    metadata = None
    if os.path.isfile(metadata_path):
        try:
            with open(metadata_path) as f:
                metadata = json.load(f)
            _check_layout(folder, metadata["parallel_layout"], expected_layout)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"checkpoint metadata {metadata_path} is unreadable: "
                                  f"{error}") from error
    position = os.path.join(folder, _position_name(groups))
    state = _safe_load(os.path.join(position, MODEL_FILE), map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {os.path.join(position, MODEL_FILE)} does not "
                              f"hold a dict")
    version = state.get("checkpoint_version", 0)
    if not isinstance(version, (int, float)) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {folder} has format version {version}, newer than "
                              f"this code's {CHECKPOINT_VERSION}")
    _check_layout(folder, state.get("parallel_layout", {}), expected_layout)
    rng = state.get("rng_state")
    if isinstance(rng, dict) and set(rng) == {_RNG_PER_DP}:
        if len(rng[_RNG_PER_DP]) != groups.dp_size:
            raise CheckpointError(f"checkpoint {folder} holds the RNG states of "
                                  f"{len(rng[_RNG_PER_DP])} data-parallel ranks but this run has "
                                  f"{groups.dp_size}")
        state["rng_state"] = rng[_RNG_PER_DP][groups.dp_rank]
    per_dp_path = os.path.join(position, distrib_optim_file(groups.dp_rank))
    if (metadata or {}).get("per_dp_rank_state") or os.path.isfile(per_dp_path):
        state["per_dp_rank_state"] = _safe_load(per_dp_path, map_location)
    return iteration, state


def load_checkpoint(load_dir: str, groups: ProcessGroups, *, expected_layout: dict,
                    map_location: Any = "cpu") -> Optional[tuple[int, dict]]:
    """Load the checkpoint ``latest`` points at: ``(iteration, state)``, or None if there is none.

    None means ``load_dir`` does not exist or holds no checkpoint at all (the caller prints
    :func:`no_checkpoint_warning` and starts from scratch). A garbled ``latest``, a missing
    folder or rank file, a file that would run code when unpickled, or a checkpoint saved with
    a different ``expected_layout`` (see :func:`parallel_layout`) raise :class:`CheckpointError`.
    ``state["rng_state"]`` is this rank's own; ``state["per_dp_rank_state"]`` is present when
    the save had per-DP-rank state. Collective: if any rank fails, every rank raises.
    """
    error: Optional[BaseException] = None
    result = None
    try:
        result = _load_local(load_dir, groups, expected_layout, map_location)
    except Exception as caught:  # noqa: BLE001 - must reach the all-reduce, or the others hang
        error = caught
    if not _all_ok(error is None):
        if isinstance(error, CheckpointError):
            raise error
        raise CheckpointError(f"loading the checkpoint from {load_dir} failed"
                              + (f": {error}" if error else " on another rank")) from error
    return result
