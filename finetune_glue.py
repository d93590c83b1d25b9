"""Fine-tune a pretrained GPT-MoE on a GLUE task (Megatron-style flags; see --help).

    torchrun --nproc-per-node 4 finetune_glue.py --task SST-2 --data-dir glue/SST-2 \
        --pretrained-checkpoint runs/gpt --expert-model-parallel-size 4 \
        --moe-a2a-compression lsh --epochs 3 --results-json runs/sst2/results.json

or python finetune_glue.py ... for one process. The code lives in megatron_lsh/finetune.
"""
import sys

from megatron_lsh.finetune.entry import main

if __name__ == "__main__":
    sys.exit(main())
