"""GLUE-style fine-tuning data and scoring: the nine tasks' files as GLUE distributes them
(:mod:`~megatron_lsh.glue.data`) and their official metrics (:mod:`~megatron_lsh.glue.metrics`).

Fine-tuning itself (``finetune_glue.py``) is :mod:`megatron_lsh.finetune`."""
