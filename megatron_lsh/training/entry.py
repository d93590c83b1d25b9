"""Shared body of the ``pretrain_*_moe.py`` entry points: where the model comes from, flags, run.

The model is defined in one of three ways:

* ``--model-recipe NAME`` (``python -m megatron_lsh.models.recipes --list``) supplies the whole
  model and MoE config; any explicit flag overrides a field of it.
* Model flags without a recipe, as in Megatron-LM: the model is what the flags say and nothing
  else. ``--num-layers``, ``--hidden-size``, ``--num-attention-heads`` and ``--seq-length`` are
  then required (an error names the missing ones), every other field has Megatron's default,
  and without ``--num-experts`` the model is dense.
* Neither: the entry point's default tiny recipe, announced on the first line of output.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
from typing import Callable, Optional, Sequence

from megatron_lsh.config import ConfigError


def recipe_base(name: str, num_layers: Optional[int] = None) -> dict:
    """Base section configs (``model``, ``moe``) of a model recipe, for the flags to override;
    ``num_layers`` (a ``--num-layers`` override) re-places the recipe's MoE layers."""
    from megatron_lsh.models.recipes import get_recipe
    recipe = get_recipe(name)
    return {"model": recipe.model(), "moe": recipe.moe(num_layers)}


MODEL_DEFINING = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                  "seq_length", "max_position_embeddings", "num_experts")
"""Flags (as namespace names) that define a model: given without a recipe, the flags alone do."""
REQUIRED_WITHOUT_RECIPE = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
"""What Megatron-LM requires of a model defined by flags."""


def base_for(namespace: argparse.Namespace, default_recipe: str) -> dict:
    """The base configs a run's flags call for (see the module docstring); ConfigError when
    model flags without a recipe leave required ones out."""
    given = set(vars(namespace))
    name = namespace.model_recipe
    if name is None and given & set(MODEL_DEFINING):
        missing = [n for n in REQUIRED_WITHOUT_RECIPE if n not in given]
        if missing:
            flags = ", ".join("--" + n.replace("_", "-") for n in missing)
            raise ConfigError(f"without --model-recipe the model is defined by its flags alone, "
                              f"and {flags} {'is' if len(missing) == 1 else 'are'} missing "
                              f"(or start from a recipe: --model-recipe NAME)")
        return {}
    if name is None:
        name = default_recipe
        if os.environ.get("RANK", "0") == "0":
            print(f"> no --model-recipe and no model flags: using the {name} recipe", flush=True)
    num_layers = getattr(namespace, "num_layers", None)
    relayout = num_layers if "moe_layer_freq" not in given else None
    try:
        return recipe_base(name, relayout)
    except KeyError as error:
        raise ConfigError(error.args[0]) from None


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


def input_errors() -> tuple:
    """The exception types that mean bad input (flags, data, checkpoint, tokenizer): reported
    as one sentence, never a traceback."""
    from megatron_lsh.data.errors import DataError
    from megatron_lsh.glue.data import GlueDataError
    from megatron_lsh.tokenizer import TokenizerError
    from megatron_lsh.training.checkpointing import CheckpointError
    from megatron_lsh.training.loop import TrainingError
    return (ConfigError, TrainingError, CheckpointError, DataError, TokenizerError,
            GlueDataError)


def announce_compat(namespace: argparse.Namespace) -> None:
    """Say once (rank 0) which accepted Megatron flags were given and do nothing here."""
    if namespace.compat_accepted and os.environ.get("RANK", "0") == "0":
        from megatron_lsh.compat import describe
        for flag in namespace.compat_accepted:
            print(f"> {flag}: accepted, nothing to do: {describe(flag)}", flush=True)


def run_job(job: Callable[[], dict]) -> int:
    """Run ``job`` (set-up and training; returns its summary) as an entry point does: bad
    input is one ``error:`` line and exit status 1; success prints the summary (rank 0).

    ``kill -USR1 <rank pid>`` prints every thread's Python stack to the rank's stderr and lets
    it run on: where a hung rank waits, without a debugger."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        summary = job()
    except input_errors() as error:
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


def main(kind: str, default_recipe: str, argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags for model ``kind`` and run pretraining; returns the exit status."""
    from megatron_lsh.arguments import parse_args_with_namespace
    from megatron_lsh.training.loop import pretrain

    argv = list(sys.argv[1:] if argv is None else argv)
    config, namespace = parse_args_with_namespace(
        argv, lambda ns: base_for(ns, default_recipe), extra_args_provider=_recipe_flag)
    announce_compat(namespace)
    return run_job(lambda: pretrain(config, kind))
