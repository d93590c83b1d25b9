"""Sample text from a GPT-MoE checkpoint (any parallel layout it was saved in).

    python tools/generate.py --load CKPT_DIR --prompt "To be, or not" --max-new-tokens 40 \
        [--greedy | --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1] [--ckpt-step N]
        [--tokenizer-type T --vocab-file F --merge-file F --tokenizer-model F]

The prompt comes from --prompt, --prompt-file, or stdin. The tokenizer is the one the run
recorded (the flags override it). The last line on stdout is the generated continuation
alone (newlines in it written as \n, so it stays one line); the prompt's and the
continuation's token counts and tokens/s go to stderr. The model
runs in one process on CPU with a KV cache and computes its experts exactly (the training
all-to-all compression does not apply).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lsh.convert.generate import Sampling, generate  # noqa: E402
from megatron_lsh.convert.load import load_model  # noqa: E402
from megatron_lsh.tokenizer import TokenizerError, build_tokenizer  # noqa: E402
from megatron_lsh.training.checkpoint_files import CheckpointError  # noqa: E402


def _prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as error:
            raise ValueError(f"cannot read --prompt-file {args.prompt_file}: "
                             f"{error.strerror}") from None
    return sys.stdin.read()


def main(argv=None) -> int:
    """CLI: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load", required=True, metavar="CKPT_DIR")
    parser.add_argument("--ckpt-step", type=int)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt")
    source.add_argument("--prompt-file")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--greedy", action="store_true", help="always the most likely token")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    for flag in ("--tokenizer-type", "--vocab-file", "--merge-file", "--tokenizer-model"):
        parser.add_argument(flag, help="overrides what the checkpoint recorded")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    try:
        sampling = Sampling(args.greedy, args.temperature, args.top_k, args.top_p, args.seed)
        loaded = load_model(args.load, args.ckpt_step)
        if loaded.kind != "gpt":
            raise ValueError(f"{args.load} holds a {loaded.kind} model; generation needs GPT")
        data = dict(loaded.run_config.get("data", {}))
        for key in ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model"):
            if getattr(args, key) is not None:
                data[key] = getattr(args, key)
        if not data.get("tokenizer_type"):
            raise ValueError("the checkpoint records no tokenizer: pass --tokenizer-type and "
                             "its files")
        tokenizer = build_tokenizer(data["tokenizer_type"], vocab_file=data.get("vocab_file"),
                                    merge_file=data.get("merge_file"),
                                    tokenizer_model=data.get("tokenizer_model"),
                                    vocab_extra_ids=data.get("vocab_extra_ids", 0),
                                    vocab_size=loaded.model_config.vocab_size)
        prompt = tokenizer.tokenize(_prompt(args))
        m = loaded.model_config
        start = time.perf_counter()
        out = generate(loaded.model, prompt, args.max_new_tokens, sampling,
                       vocab_size=tokenizer.vocab_size, stop_id=tokenizer.eod,
                       max_positions=m.max_position_embeddings if m.uses_learned_positions
                       else None)
        seconds = time.perf_counter() - start
    except (CheckpointError, TokenizerError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"> iteration {loaded.iteration} of {args.load}: {len(prompt)} prompt tokens, "
          f"{len(out)} generated in {seconds:.2f} s ({len(out) / seconds:.1f} tokens/s)",
          file=sys.stderr)
    text = tokenizer.detokenize([t for t in out if t != tokenizer.eod])
    print(text.replace("\n", "\\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
