#!/usr/bin/env bash
# Sourced by tests/run.sh and examples/quickstart.sh: create or reuse .venv and install the
# package with its test extras. Sets PY to the venv's python.
#
# torch: on a machine without CUDA we install the CPU wheel torch==2.13.0 first, because a bare
# "torch" requirement would pull a multi-GB CUDA build. The package itself only asks for a range.
VENV_DIR="${VENV_DIR:-.venv}"
if [[ ! -x "$VENV_DIR/bin/python" ]]; then
  echo "[setup] creating $VENV_DIR"
  python3 -m venv "$VENV_DIR"
fi
PY="$VENV_DIR/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] installing torch (CUDA machine)"
    "$PY" -m pip install -q torch
  else
    echo "[setup] installing torch==2.13.0 (CPU)"
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
# Reinstall only when the packaging or the C++ extensions changed since the last install.
stamp_src=$(cat pyproject.toml setup.py megatron_lsh/data/helpers.cpp megatron_lsh/moe/compressors/split_rounds.cpp 2>/dev/null | sha1sum | cut -d' ' -f1)
stamp_file="$VENV_DIR/.megatron_lsh_stamp"
if [[ ! -f "$stamp_file" || "$(cat "$stamp_file")" != "$stamp_src" ]] || ! "$PY" -c "import megatron_lsh.data._helpers, megatron_lsh.moe.compressors._split" 2>/dev/null; then
  echo "[setup] installing megatron-lsh (editable) with test extras"
  "$PY" -m pip install -q "setuptools>=64" wheel "pybind11>=2.10"
  "$PY" -m pip install -q --no-build-isolation -e ".[test,bench]"
  echo "$stamp_src" > "$stamp_file"
fi
export PY
