"""Using a trained checkpoint outside training: load it whole into one process (any layout it
was saved in), export it to Hugging Face ``transformers``, sample text from it.

- :mod:`~megatron_lsh.convert.load`: a checkpoint folder -> the single-process model and its
  config (the building block of the others);
- :mod:`~megatron_lsh.convert.hf`: GPT-MoE in the Mixtral-style architecture ->
  ``MixtralForCausalLM`` folder (config.json, safetensors, tokenizer files);
- :mod:`~megatron_lsh.convert.generate`: autoregressive sampling with a KV cache.
"""
