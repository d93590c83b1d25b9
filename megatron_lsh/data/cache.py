"""Build dataset index arrays once and cache them next to the data.

The arrays of a dataset (GPT doc/sample/shuffle indices, the MLM/T5 sentence mapping) are a
pure function of a *description* (data files, document range, sample count, seed...). Its
hash names the cache files: ``{cache_dir}/{name}-{hash}-{array}.npy`` plus a
``-description.json`` written last, which marks the set complete.

With ``torch.distributed`` initialised, rank 0 of ``group`` builds and writes while the other
ranks wait at a barrier, then every rank memory-maps the files (all ranks of the group must
construct the dataset). Without it, the process builds if needed. When the cache folder is
not writable the arrays are built in memory on every rank (they are deterministic).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from typing import Callable, Dict, Optional

import numpy as np

CACHE_FORMAT = 1


def data_fingerprint(prefix: str) -> dict:
    """What identifies a dataset's files: absolute prefix, sizes and modification times."""
    prefix = os.path.abspath(prefix)
    info = {"prefix": prefix}
    for suffix in (".idx", ".bin"):
        st = os.stat(prefix + suffix)
        info[suffix] = [st.st_size, st.st_mtime_ns]
    return info


def default_cache_dir(prefix: str) -> str:
    """``index-cache/`` in the folder that holds the dataset."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


def _paths(cache_dir: str, name: str, description: dict, keys) -> Dict[str, str]:
    blob = json.dumps({"format": CACHE_FORMAT, **description}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    base = os.path.join(cache_dir, f"{name}-{digest}")
    paths = {key: f"{base}-{key}.npy" for key in keys}
    paths["__description__"] = f"{base}-description.json"
    return paths


def _complete(paths: Dict[str, str]) -> bool:
    return all(os.path.isfile(p) for p in paths.values())


def _write(paths: Dict[str, str], arrays: Dict[str, np.ndarray], description: dict) -> bool:
    try:
        os.makedirs(os.path.dirname(paths["__description__"]), exist_ok=True)
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for key, array in arrays.items():
            with open(paths[key] + tag, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(paths[key] + tag, paths[key])
        desc_path = paths["__description__"]
        with open(desc_path + tag, "w") as f:
            json.dump(description, f, indent=1, sort_keys=True, default=str)
        os.replace(desc_path + tag, desc_path)
        return True
    except OSError as e:
        print(f"[data] warning: could not write the index cache in {os.path.dirname(paths['__description__'])} "
              f"({e.strerror}); building indices in memory", file=sys.stderr)
        return False


def _distributed_rank(group) -> Optional[int]:
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group)
    return None


def cached_index_arrays(cache_dir: str, name: str, description: dict,
                        build: Callable[[], Dict[str, np.ndarray]], keys,
                        group=None, log: Callable[[str], None] = None) -> Dict[str, np.ndarray]:
    """The arrays ``build()`` returns, from the cache when present (memory-mapped, read-only).

    ``keys`` names the arrays ``build`` returns; ``description`` must hold everything the
    arrays depend on (it is hashed into the file names and stored beside them).
    """
    paths = _paths(cache_dir, name, description, keys)
    rank = _distributed_rank(group)
    built: Optional[Dict[str, np.ndarray]] = None
    if rank in (None, 0) and not _complete(paths):
        start = time.time()
        built = build()
        missing = set(keys) - set(built)
        if missing:
            raise RuntimeError(f"index builder for {name} did not return {sorted(missing)}")
        _write(paths, built, description)
        if log is not None:
            log(f"built {name} indices in {time.time() - start:.2f}s -> {paths['__description__']}")
    if rank is not None:
        import torch.distributed as dist
        dist.barrier(group=group)
    if _complete(paths):
        return {key: np.load(paths[key], mmap_mode="r", allow_pickle=False) for key in keys}
    if built is None:  # the cache could not be written: every rank builds for itself
        built = build()
    return {key: built[key] for key in keys}
