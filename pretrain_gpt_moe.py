"""Pretrain GPT-MoE (Megatron-style flags; see --help).

    torchrun --nproc-per-node 4 pretrain_gpt_moe.py --model-recipe tiny-gpt-moe \
        --expert-model-parallel-size 4 --moe-a2a-compression lsh --data-path PREFIX ...

or python pretrain_gpt_moe.py ... for one process.
"""
import sys

from megatron_lsh.training.entry import main

if __name__ == "__main__":
    sys.exit(main("gpt", default_recipe="tiny-gpt-moe"))
