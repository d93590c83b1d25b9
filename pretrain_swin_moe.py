"""Pretrain Swin-MoE on an image folder (Megatron-style flags; see --help).

    torchrun --nproc-per-node 4 pretrain_swin_moe.py --model-recipe tiny-swin-moe \
        --expert-model-parallel-size 4 --moe-a2a-compression lsh --data-path DIR ...

``DIR`` holds ``train/<class>/*.png`` and ``val/<class>/*.png`` (ImageNet's layout).
``--finetune --load CKPT`` starts from a checkpoint's weights. Or python pretrain_swin_moe.py
... for one process.
"""
import sys

from megatron_lsh.training.entry import main

if __name__ == "__main__":
    sys.exit(main("swin", default_recipe="tiny-swin-moe"))
