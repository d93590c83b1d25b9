"""Convert a GPT-MoE checkpoint (any parallel layout) to Megatron-LM's ``--ckpt-format torch``.

    python tools/checkpoint/convert_megatron.py --load CKPT_DIR --output DIR [--ckpt-step N]

Writes one shard (TP = PP = EP = 1) with Megatron-core's GPT state-dict names and prints the
Megatron-LM flags that describe the model; continue in Megatron-LM with
``pretrain_gpt.py --load DIR --ckpt-format torch --no-load-optim --no-load-rng [--finetune]``
plus those flags (the optimizer state is not converted). See
``megatron_lsh/convert/megatron.py`` for the name mapping.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_lsh.convert.load import add_checkpoint_flags, load_model  # noqa: E402
from megatron_lsh.convert.megatron import convert, megatron_flags  # noqa: E402
from megatron_lsh.training.checkpoint_files import CheckpointError  # noqa: E402


def main(argv=None) -> int:
    """CLI: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_checkpoint_flags(parser)
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.load, args.ckpt_step)
        shard = convert(loaded, args.output)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"> wrote {shard} (iteration {loaded.iteration})")
    print("> Megatron-LM model flags: " + shlex.join(megatron_flags(loaded)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
