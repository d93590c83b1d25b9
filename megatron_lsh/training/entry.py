"""Shared body of the ``pretrain_*_moe.py`` entry points: recipe defaults, flags, run.

``--model-recipe NAME`` (see ``python -m megatron_lsh.models.recipes --list``) supplies the
whole model and MoE config as the base; any explicit flag overrides a field of it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron_lsh.config import ConfigError


def recipe_base(name: str, num_layers: Optional[int] = None) -> dict:
    """Base section configs (``model``, ``moe``) of a model recipe, for the flags to override;
    ``num_layers`` (a ``--num-layers`` override) re-places the recipe's MoE layers."""
    from megatron_lsh.models.recipes import get_recipe
    recipe = get_recipe(name)
    return {"model": recipe.model(), "moe": recipe.moe(num_layers)}


def _recipe_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model-recipe", default=None,
                        help="start from a named model recipe (tiny-gpt-moe, gpt-moe-15b, ...); "
                             "explicit flags override it")
    return parser


def report_error(error: BaseException) -> None:
    """Print ``error`` as one ``error: ...`` line, once per problem.

    Errors every rank raises alike (a bad flag: all ranks parse the same command line; a failed
    collective save or load, marked ``all_ranks``) are printed by rank 0 alone, a stuck
    collective by the ``speaker`` the watchdog chose (the lowest rank that reached it); any
    other is printed by each rank that hit it, prefixed with its rank so lines stay apart.
    """
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    speaker = getattr(error, "speaker", None)
    alike = (isinstance(error, ConfigError) or getattr(error, "all_ranks", False)
             or speaker is not None)
    if alike and rank != (speaker or 0):
        return
    prefix = "" if alike or world == 1 else f"[rank {rank}] "
    sys.stderr.write(f"{prefix}error: {error}\n")   # one write: lines of ranks do not mix
    sys.stderr.flush()


def main(kind: str, default_recipe: str, argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags for model ``kind`` and run pretraining; returns the exit status."""
    from megatron_lsh.arguments import parse_args_with_namespace
    from megatron_lsh.training.loop import TrainingError, pretrain

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    _recipe_flag(pre)
    known, _ = pre.parse_known_args(argv)
    try:
        base = recipe_base(known.model_recipe or default_recipe)
    except KeyError as error:
        print(f"error: {error.args[0]}", file=sys.stderr)
        return 2
    config, _ = parse_args_with_namespace(argv, base, extra_args_provider=_recipe_flag)
    from megatron_lsh.data.errors import DataError
    from megatron_lsh.tokenizer import TokenizerError
    from megatron_lsh.training.checkpointing import CheckpointError
    try:
        summary = pretrain(config, kind)
    except (ConfigError, TrainingError, CheckpointError, DataError, TokenizerError) as error:
        # One sentence, no traceback: these are problems with the input, not bugs.
        report_error(error)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(f"> done: {summary}")
    from megatron_lsh.parallel.dims import lingering_gloo_threads
    leftover = lingering_gloo_threads()   # after collecting the trainer's reference cycles
    if leftover:
        # A process group outlived destroy_process_group: tearing it down during interpreter
        # shutdown can abort a finished run. Everything is saved and flushed: leave now.
        print(f"WARNING: {len(leftover)} gloo threads outlived the process group; exiting "
              f"without interpreter teardown", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
