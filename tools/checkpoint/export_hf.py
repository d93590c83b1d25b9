"""Export a GPT-MoE checkpoint (any parallel layout) as a Hugging Face ``MixtralForCausalLM``.

    python tools/checkpoint/export_hf.py --load CKPT_DIR --output DIR [--ckpt-step N]
        [--tokenizer-type T --vocab-file F --merge-file F --tokenizer-model F]

Writes DIR/config.json, DIR/model.safetensors, the tokenizer files (from the tokenizer the
run recorded, or the flags given) and generation_config.json; ``transformers`` then loads it
with ``AutoModelForCausalLM.from_pretrained(DIR)``. The architecture must be Mixtral's
(RMSNorm, RoPE, SwiGLU experts on every layer, no biases, softmax top-k >= 2, no shared
expert; grouped-query attention and tied or untied output are fine): otherwise the tool says
which settings have no Mixtral equivalent and writes nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_lsh.convert.hf import export  # noqa: E402
from megatron_lsh.convert.load import add_checkpoint_flags, load_model  # noqa: E402
from megatron_lsh.training.checkpoint_files import CheckpointError  # noqa: E402


def main(argv=None) -> int:
    """CLI: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_checkpoint_flags(parser)
    for flag in ("--tokenizer-type", "--vocab-file", "--merge-file", "--tokenizer-model"):
        parser.add_argument(flag, help="overrides what the checkpoint recorded")
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.load, args.ckpt_step)
        print(f"> loaded iteration {loaded.iteration} of {args.load} ({loaded.kind})")
        notes = export(loaded, args.output, {"tokenizer_type": args.tokenizer_type,
                                             "vocab_file": args.vocab_file,
                                             "merge_file": args.merge_file,
                                             "tokenizer_model": args.tokenizer_model})
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"> note: {note}")
    print(f"> exported to {args.output} (MixtralForCausalLM)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
