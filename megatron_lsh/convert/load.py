"""A checkpoint folder -> the whole model in one process, whatever layout it was saved in.

The run's config and model kind are read from the checkpoint itself; the model is built on
CPU with the uncompressed all-to-all (compression approximates the expert all-to-all during
training; a model outside training computes its experts exactly) and filled by resharding
(:mod:`~megatron_lsh.training.reshard`) into the single-process layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from megatron_lsh.config import ConfigError, ModelConfig, MoEConfig
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.training.checkpoint_files import CheckpointError, iteration_dir, read_latest
from megatron_lsh.training.checkpointing import is_compressor_state


def _known(cls, values: dict) -> dict:
    """The entries of ``values`` that are fields of ``cls`` (configs of other versions)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def checkpoint_folder(load_dir: str, step: Optional[int] = None) -> tuple[int, str]:
    """``(iteration, folder)`` of ``--load DIR`` (its latest, or ``step``)."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"checkpoint folder {load_dir} does not exist")
    iteration = step if step is not None else read_latest(load_dir)
    if iteration is None:
        raise CheckpointError(f"{load_dir} holds no checkpoint (no "
                              f"latest_checkpointed_iteration.txt)")
    folder = iteration_dir(load_dir, iteration)
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint iteration {iteration} has no folder {folder}")
    return iteration, folder


def _kind_from_names(names) -> str:
    names = list(names)
    if any(n.startswith("encoder.") for n in names):
        return "t5"
    if any(n.startswith("lm_head.") or n.startswith("mlm_head.") for n in names):
        return "roberta"
    return "gpt"


@dataclass
class CheckpointSource:
    """A checkpoint opened for reading by name in any layout, with what describes it."""

    source: object
    """The :class:`~megatron_lsh.training.reshard.SourceCheckpoint` to reshard from."""
    kind: str
    model_config: ModelConfig
    moe_config: MoEConfig
    """The saved MoE config with the uncompressed all-to-all (see the module docstring)."""
    run_config: dict
    iteration: int
    folder: str


def open_checkpoint(load_dir: str, step: Optional[int] = None) -> CheckpointSource:
    """Open ``load_dir``'s latest checkpoint (or iteration ``step``) and read its configs.

    CheckpointError (one sentence) for a missing or corrupt folder or a config this code
    cannot rebuild.
    """
    from megatron_lsh.training.checkpointing import read_metadata
    from megatron_lsh.training.reshard import SourceCheckpoint

    iteration, folder = checkpoint_folder(load_dir, step)
    metadata = read_metadata(folder)
    layout = metadata.get("parallel_layout")
    source = SourceCheckpoint(folder, metadata, layout or {})
    first = source.model_file(min(source.positions))
    if layout is None:   # no metadata: the rank file has its own copy
        source = SourceCheckpoint(folder, metadata, first.get("parallel_layout", {}))
    config = first.get("config")
    if not isinstance(config, dict) or "model" not in config or "moe" not in config:
        raise CheckpointError(f"checkpoint {folder} does not record its model config")
    kind = first.get("model_kind") or _kind_from_names(first["model"])
    try:
        model_config = ModelConfig(**_known(ModelConfig, config["model"]))
        moe_values = _known(MoEConfig, config["moe"])
        moe_values.update(a2a_compression="none", compression_options=None)
        moe_config = MoEConfig(**moe_values)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"checkpoint {folder} records a config this code cannot build: "
                              f"{error}") from None
    return CheckpointSource(source, kind, model_config, moe_config, config, iteration, folder)


@dataclass
class LoadedModel(CheckpointSource):
    """A checkpoint's model in one process, with what describes it (the checkpoint's
    :class:`CheckpointSource` fields: ``kind``, ``model_config``, ``moe_config``,
    ``run_config``, ``iteration``, ``folder``)."""

    model: torch.nn.Module = None


def load_model(load_dir: str, step: Optional[int] = None) -> LoadedModel:
    """The model of ``load_dir``'s latest checkpoint (or iteration ``step``), in one process
    (CheckpointError as :func:`open_checkpoint`)."""
    from megatron_lsh.models import build_model
    from megatron_lsh.training.reshard import Resharder

    ckpt = open_checkpoint(load_dir, step)
    groups = ProcessGroups.single()
    model = build_model(ckpt.kind, ckpt.model_config, ckpt.moe_config, groups,
                        seed=ckpt.run_config.get("training", {}).get("seed", 1234))
    Resharder(ckpt.source, groups).load_model(model, ignore=is_compressor_state)
    model.eval()
    return LoadedModel(**{f.name: getattr(ckpt, f.name)
                          for f in dataclasses.fields(CheckpointSource)}, model=model)


@contextlib.contextmanager
def output_folder(output: str) -> Iterator[str]:
    """A temporary sibling of ``output`` to write into; renamed to ``output`` when the block
    succeeds, removed when it fails, so no partial output is ever left. ``output`` must not
    exist, or be an empty folder."""
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise CheckpointError(f"output {output} exists and is not an empty folder")
    parent = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):   # mkdtemp makes it private
            os.chmod(root, 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        if os.path.isdir(output):
            os.rmdir(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def add_checkpoint_flags(parser) -> None:
    """``--load``, ``--output`` and ``--ckpt-step``, as the export tools take them."""
    parser.add_argument("--load", required=True, metavar="CKPT_DIR", help="the --save folder")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to create")
    parser.add_argument("--ckpt-step", type=int, help="iteration to use (default: latest)")
