"""Shared body of the ``pretrain_*_moe.py`` entry points: recipe defaults, flags, run.

``--model-recipe NAME`` (see ``python -m megatron_lsh.models.recipes --list``) supplies the
model shape and MoE layout as defaults; any explicit flag overrides them.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron_lsh.config import ConfigError, ModelConfig, MoEConfig

# Recipe fields that become flag defaults (the flags' dest names).
_MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "seq_length", "max_position_embeddings", "decoder_num_layers",
                 "decoder_seq_length", "vocab_size", "hidden_dropout", "attention_dropout")
_MOE_FIELDS = {"num_experts": "num_experts", "moe_layer_freq": "moe_layer_freq",
               "router_topk": "moe_router_topk"}


def recipe_defaults(name: str) -> dict:
    """Flag defaults (dest-keyed) taken from a model recipe."""
    from megatron_lsh.models.recipes import get_recipe
    recipe = get_recipe(name)
    model: ModelConfig = recipe.model()
    moe: MoEConfig = recipe.moe()
    out = {f: getattr(model, f) for f in _MODEL_FIELDS}
    out.update({dest: getattr(moe, f) for f, dest in _MOE_FIELDS.items()})
    return out


def _recipe_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model-recipe", default=None,
                        help="start from a named model recipe (tiny-gpt-moe, gpt-moe-15b, ...); "
                             "explicit flags override it")
    return parser


def main(kind: str, default_recipe: str, argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags for model ``kind`` and run pretraining; returns the exit status."""
    from megatron_lsh.arguments import parse_args_with_namespace
    from megatron_lsh.training.loop import TrainingError, pretrain

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    _recipe_flag(pre)
    known, _ = pre.parse_known_args(argv)
    try:
        defaults = recipe_defaults(known.model_recipe or default_recipe)
    except KeyError as error:
        print(f"error: {error.args[0]}", file=sys.stderr)
        return 2
    config, _ = parse_args_with_namespace(argv, defaults, extra_args_provider=_recipe_flag)
    from megatron_lsh.data.errors import DataError
    from megatron_lsh.tokenizer import TokenizerError
    from megatron_lsh.training.checkpointing import CheckpointError
    try:
        summary = pretrain(config, kind)
    except (ConfigError, TrainingError, CheckpointError, DataError, TokenizerError) as error:
        # One sentence, no traceback: these are problems with the input, not bugs.
        print(f"error: {error}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(f"> done: {summary}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The process group is destroyed, but gloo's worker threads can still be torn down
        # during interpreter finalization and abort the process ("terminate called without an
        # active exception", seen at random after a clean run). Everything is saved and
        # flushed at this point, so leave without finalization.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
