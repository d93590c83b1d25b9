"""GLUE-style fine-tuning data and scoring: the nine tasks' files as GLUE distributes them
(:mod:`~megatron_lsh.glue.data`) and their official metrics (:mod:`~megatron_lsh.glue.metrics`).

The fine-tuning entry point that uses them (``finetune_glue.py``) is not written yet."""
