"""Fine-tuning a pretrained GPT-MoE on GLUE-style tasks (``finetune_glue.py``).

- ``data``: GLUE examples -> token tensors, train epochs and evaluation loaders;
- ``task``: the classification / regression objective as a training task;
- ``trainer``: the pretraining trainer with epochs, dev scoring, early stopping, test
  predictions and the pretrained body loaded in any layout;
- ``report``: the results JSON and markdown table; ``entry``: the command line.

The task files and metrics themselves are in :mod:`megatron_lsh.glue`.
"""
