"""The trainer's building blocks and loop.

- ``lr_schedule``: warmup + constant / linear / cosine decay written into optimizer groups.
- ``checkpointing``: Megatron's checkpoint layout, saved atomically, loaded with
  ``weights_only=True`` and a parallel-layout check.
- ``logger``: the Megatron log line, validation box, TensorBoard and per-iteration JSONL.
- ``signals``: SIGTERM -> save and exit on every rank together; exit-duration timer.

Importing this package imports none of them (entry points pay only for what they use).
"""
