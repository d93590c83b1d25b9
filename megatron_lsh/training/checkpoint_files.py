"""The files of a checkpoint: durable writes, safe loads, checksums, free space, pruning.

:mod:`~megatron_lsh.training.checkpointing` orchestrates a save or a load across ranks; this
module holds what one process does to the files:

* **durable writes**: every file is fsynced, small text files are replaced atomically;
* **safe loads**: ``torch.load(weights_only=True)``, so a file holding anything but tensors and
  plain values is refused instead of unpickled;
* **checksums**: each file's SHA-256 and size are computed at save by streaming it back (it is
  in the page cache right after the write, so this costs a memory-speed read) and recorded in
  the checkpoint's metadata; a load streams the file again and refuses a mismatch, naming the
  file. Bit flips, truncation and deletion all become one sentence instead of garbage weights;
* **free space**: a save first checks that the filesystem has room for the bytes it will write
  (the tensors' sizes plus a margin), so a full disk is reported before anything is written;
* **pruning** of old checkpoints (``--keep-last-n-checkpoints``) and the cleanup of what crashed
  saves left behind (``iter_*.tmp-*``, ``iter_*.del-*``; an ``iter_*.old-*`` folder a crashed
  swap left is put back).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import secrets
import shutil
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

MODEL_FILE = "model_optim_rng.pt"
"""Each (tp, pp, ep) position's model / optimizer / RNG file (Megatron's name)."""
LATEST_FILE = "latest_checkpointed_iteration.txt"
DIGEST = "sha256"
_CHUNK = 8 << 20
_ITER = re.compile(r"^iter_(\d{7})$")
STALE = re.compile(r"^(iter_\d{7})\.(tmp|old|del)-[0-9a-f]+$")
"""Folders a crashed save left: temp (``tmp``), swapped-out (``old``), being pruned (``del``)."""
FREE_SPACE_MARGIN = 1.05
"""A save needs this factor times its tensors' bytes free (zip headers, pickled structure)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names the file or folder."""


def iteration_dir(root: str, iteration: int) -> str:
    """``{root}/iter_{iteration:07d}``."""
    return os.path.join(root, f"iter_{iteration:07d}")


# -- durable writes and safe loads ------------------------------------------------------------

def fsync_dir(path: str) -> None:
    """Make a folder's entries (renames, new files) durable; a no-op where unsupported."""
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


def write_file(path: str, obj: Any) -> dict:
    """``torch.save`` ``obj`` to ``path`` and fsync it; returns its :func:`file_record`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as error:
        if _no_space(error):
            raise CheckpointError(f"no space left on the device while writing {path}") from error
        raise
    return file_record(path)


def _no_space(error: BaseException) -> bool:
    # torch's zip writer reports a full disk as "unexpected pos" or "file write failed".
    text = str(error)
    return (getattr(error, "errno", None) == 28 or "No space left" in text
            or "unexpected pos" in text or "file write failed" in text)


def write_text_atomically(path: str, text: str) -> None:
    """Write ``text`` to a temp file next to ``path``, fsync, rename over ``path``."""
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def safe_load(path: str, map_location: Any, record: Optional[dict] = None, *,
              mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of ``path``, checked against ``record`` when given;
    ``mmap``: tensors stay in the file until read (for loading many shards lazily)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    if record is not None:
        verify_file(path, record)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        culprit = f" (it refers to {found.group(1)})" if found else ""
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and "
                              f"plain python values{culprit}, and unpickling them could run "
                              f"code") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint file {path}: {reason}") from error


# -- checksums --------------------------------------------------------------------------------

def file_digest(path: str) -> str:
    """Hex SHA-256 of the file, read in 8 MiB chunks."""
    h = hashlib.new(DIGEST)
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def file_record(path: str) -> dict:
    """What a checkpoint's metadata records of one file: its size and checksum."""
    return {"bytes": os.path.getsize(path), DIGEST: file_digest(path)}


def verify_file(path: str, record: dict) -> None:
    """Raise :class:`CheckpointError` unless ``path`` has the size and checksum in ``record``."""
    size = os.path.getsize(path)
    if size != record.get("bytes", size):
        raise CheckpointError(f"checkpoint file {path} is truncated or altered: it has {size} "
                              f"bytes, {record['bytes']} were written at save")
    if DIGEST in record and file_digest(path) != record[DIGEST]:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its {DIGEST} does not match "
                              f"the one recorded at save")


# -- free space -------------------------------------------------------------------------------

def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensor data inside nested dicts / lists / tuples (what a save writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def free_space_problem(folder: str, needed: int) -> Optional[str]:
    """One sentence when the filesystem of ``folder`` has less than ``needed`` bytes free."""
    needed = int(needed * FREE_SPACE_MARGIN) + (1 << 20)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None  # cannot tell: let the write itself report
    if free >= needed:
        return None
    return (f"not enough free space to save a checkpoint in {folder}: about "
            f"{needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free")


# -- folders ----------------------------------------------------------------------------------

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


def saved_iterations(root: str) -> list:
    """Iterations with a published ``iter_*`` folder under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER.match, os.listdir(root)) if m)


def clean_stale(root: str) -> list:
    """Remove what crashed saves left; put back an old folder a crashed swap left.

    Returns the names removed or restored (for a log line).
    """
    touched = []
    if not os.path.isdir(root):
        return touched
    for name in sorted(os.listdir(root)):
        match = STALE.match(name)
        if not match:
            continue
        path, final = os.path.join(root, name), os.path.join(root, match.group(1))
        if match.group(2) == "old" and not os.path.exists(final):
            os.rename(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)
        touched.append(name)
    return touched


def prune(root: str, keep: int, protect: Iterable[int] = ()) -> list:
    """Delete all but the newest ``keep`` checkpoints under ``root``; never one in ``protect``.

    Each folder is first renamed to ``iter_*.del-*`` (atomic), so a crash mid-delete leaves a
    name loads ignore and the next start removes. Returns the iterations deleted.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    protect = set(protect)
    iterations = saved_iterations(root)
    doomed = [i for i in iterations[:-keep] if i not in protect]
    for iteration in doomed:
        folder = iteration_dir(root, iteration)
        trash = f"{folder}.del-{secrets.token_hex(4)}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        fsync_dir(root)
    return doomed


# -- errors every rank raises alike -----------------------------------------------------------

def gather_problems(problem: Optional[str], extra: Any = None) -> list:
    """``(problem, extra)`` of every rank, in rank order (collective; also a barrier)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [(problem, extra)]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, (problem, extra))
    return out


def raise_first(statuses: list, what: str) -> None:
    """Raise the first failing rank's problem on every rank (one sentence, the same everywhere),
    naming that rank unless every rank failed alike."""
    failed = [(rank, problem) for rank, (problem, _) in enumerate(statuses) if problem]
    if not failed:
        return
    rank, problem = failed[0]
    if len(failed) < len(statuses) or any(p != problem for _, p in failed):
        problem = f"{problem} (rank {rank}; {len(failed)} of {len(statuses)} ranks failed)"
    error = CheckpointError(problem if problem else f"{what} failed")
    error.all_ranks = True
    raise error
