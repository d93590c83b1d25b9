"""megatron-lsh: Megatron-style Mixture-of-Experts pretraining with an LSH-compressed all-to-all.

Layering (imports flow one way): ``parallel`` <- ``moe`` <- ``models`` <- ``training``.
``data`` and ``tokenizer`` are independent of the model code.
"""

__version__ = "0.1.0"
