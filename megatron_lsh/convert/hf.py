"""Export a GPT-MoE checkpoint to Hugging Face ``transformers`` as ``MixtralForCausalLM``.

The architecture must be the one Mixtral computes: RMSNorm, RoPE over the whole head, SwiGLU
experts, no biases, MoE on every layer with softmax top-k routing (k >= 2: Mixtral
renormalises the top-k weights, so with k = 1 its gate would be 1 where ours is the
probability), dropless, no shared expert. Grouped-query attention, untied or tied output
weights are fine. :func:`unsupported` lists, in one sentence each, what a config has that
Mixtral does not; :func:`export` refuses such a config with all of them.

Weights are written under the original Mixtral names (``block_sparse_moe.experts.{e}.w1``,
...), which every ``transformers`` version loads (recent ones fuse them on load). Our fused
``qkv`` (groups of ``[query heads of the group, key, value]``) is split into ``q_proj`` /
``k_proj`` / ``v_proj``; the experts' ``fc1`` ``[h, 2 x ffn]`` (gate, then up) into ``w1`` and
``w3``. The vocabulary keeps its padded size (the padding rows are part of the model's logits
here too).

The output folder is written in a temporary sibling and renamed into place at the end, so a
failed export leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from megatron_lsh.convert.load import LoadedModel, output_folder
from megatron_lsh.models.embedding import padded_vocab_size
from megatron_lsh.training.checkpoint_files import CheckpointError


def unsupported(loaded: LoadedModel) -> list:
    """Why the model is not a Mixtral (empty when it is), one sentence per reason."""
    m, moe = loaded.model_config, loaded.moe_config
    reasons = []
    if loaded.kind != "gpt":
        reasons.append(f"it is a {loaded.kind} model (only GPT-MoE exports as Mixtral)")
    checks = [
        (m.normalization == "RMSNorm", f"--normalization is {m.normalization} (Mixtral: RMSNorm)"),
        (m.position_embedding_type == "rope" and m.rotary_percent == 1.0,
         f"positions are {m.position_embedding_type} with --rotary-percent {m.rotary_percent} "
         f"(Mixtral: rope over the whole head)"),
        (m.activation == "swiglu", f"the activation is {m.activation} (Mixtral: --swiglu)"),
        (not m.add_bias_linear, "linear layers have biases (Mixtral: --disable-bias-linear)"),
        (moe.num_experts > 0, "the model is dense (no --num-experts)"),
        (all(moe.is_moe_layer(p, m.num_layers) for p in range(1, m.num_layers + 1))
         if moe.num_experts > 0 else True,
         "not every layer is MoE (Mixtral has no dense layers: --moe-layer-freq 1)"),
        (moe.score_function == "softmax",
         f"router scores are {moe.score_function} (Mixtral: softmax)"),
        (moe.router_topk >= 2, "the router picks 1 expert (Mixtral renormalises the top-k "
                               "weights, so its single gate would be 1)"),
        (moe.capacity_factor is None, "experts have a capacity (Mixtral is dropless)"),
        (not moe.shared_expert_intermediate_size, "the MoE layers have a shared expert"),
    ]
    reasons += [why for ok, why in checks if not ok]
    return reasons


def mixtral_config(loaded: LoadedModel) -> dict:
    """``config.json`` of the exported model."""
    m, moe = loaded.model_config, loaded.moe_config
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1),
        "hidden_size": m.hidden_size,
        "intermediate_size": moe.moe_ffn_hidden_size or m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups, "head_dim": m.kv_channels,
        "hidden_act": "silu", "max_position_embeddings": m.max_position_embeddings,
        "initializer_range": m.init_method_std, "rms_norm_eps": m.layernorm_epsilon,
        "rope_theta": float(m.rotary_base), "attention_dropout": 0.0, "sliding_window": None,
        "num_experts_per_tok": moe.router_topk, "num_local_experts": moe.num_experts,
        "router_aux_loss_coef": moe.aux_loss_coeff, "output_router_logits": False,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "use_cache": True, "torch_dtype": "float32",
    }


def mixtral_state_dict(loaded: LoadedModel) -> dict:
    """Our parameters under Mixtral's names (fp32, contiguous)."""
    m, moe = loaded.model_config, loaded.moe_config
    ours = {k: v.detach().float() for k, v in loaded.model.state_dict().items()}
    g, per, d, h = m.num_query_groups, m.num_attention_heads // m.num_query_groups, \
        m.kv_channels, m.hidden_size
    ffn = moe.moe_ffn_hidden_size or m.ffn_hidden_size
    out = {"model.embed_tokens.weight": ours["embedding.word_embeddings.weight"],
           "model.norm.weight": ours["decoder.final_layernorm.weight"]}
    if m.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = ours["output_layer.weight"]
    for n in range(1, m.num_layers + 1):
        src, dst = f"decoder.layers.{n}.", f"model.layers.{n - 1}."
        qkv = ours[src + "attention.qkv.weight"].view(g, per + 2, d, h)
        out[dst + "self_attn.q_proj.weight"] = qkv[:, :per].reshape(g * per * d, h)
        out[dst + "self_attn.k_proj.weight"] = qkv[:, per].reshape(g * d, h)
        out[dst + "self_attn.v_proj.weight"] = qkv[:, per + 1].reshape(g * d, h)
        out[dst + "self_attn.o_proj.weight"] = ours[src + "attention.out.weight"]
        out[dst + "input_layernorm.weight"] = ours[src + "ln_attn.weight"]
        out[dst + "post_attention_layernorm.weight"] = ours[src + "ln_mlp.weight"]
        out[dst + "block_sparse_moe.gate.weight"] = ours[src + "mlp.router.weight"]
        fc1, fc2 = ours[src + "mlp.experts.fc1_weight"], ours[src + "mlp.experts.fc2_weight"]
        for e in range(moe.num_experts):
            expert = f"{dst}block_sparse_moe.experts.{e}."
            out[expert + "w1.weight"] = fc1[e][:, :ffn].t()   # gate
            out[expert + "w3.weight"] = fc1[e][:, ffn:].t()   # up
            out[expert + "w2.weight"] = fc2[e].t()            # down
    return {k: v.contiguous() for k, v in out.items()}


def _tokenizer_files(run_config: dict, folder: str, overrides: dict) -> Optional[str]:
    """Write the training tokenizer as Hugging Face files into ``folder``; returns a note
    when there is nothing to write (NullTokenizer, no tokenizer recorded)."""
    data = dict(run_config.get("data", {}))
    data.update({k: v for k, v in overrides.items() if v is not None})
    kind = data.get("tokenizer_type")
    if kind in (None, "NullTokenizer"):
        return (f"no tokenizer files: the run used {kind or 'no tokenizer'} (pass "
                f"--tokenizer-type and its files to add them)")
    from megatron_lsh.tokenizer import build_tokenizer
    tok = build_tokenizer(kind, vocab_file=data.get("vocab_file"),
                          merge_file=data.get("merge_file"),
                          tokenizer_model=data.get("tokenizer_model"),
                          vocab_extra_ids=data.get("vocab_extra_ids", 0))
    config = {"model_max_length": run_config.get("model", {}).get("seq_length", 2048)}
    if kind in ("SentencePieceTokenizer", "Llama2Tokenizer"):
        shutil.copy(data["tokenizer_model"], os.path.join(folder, "tokenizer.model"))
        config.update(tokenizer_class="LlamaTokenizer")
    else:
        hf = _as_hf_tokenizer(tok, kind, data)
        hf.save(os.path.join(folder, "tokenizer.json"))
        config.update(tokenizer_class="PreTrainedTokenizerFast")
    eod = tok.detokenize([tok.eod]) if tok.eod is not None else None
    if eod:
        config.update(eos_token=eod, bos_token=eod)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return None


def _as_hf_tokenizer(tok, kind: str, data: dict):
    """A ``tokenizers.Tokenizer`` with the same ids as ``tok`` (special tokens included)."""
    import tokenizers
    if kind == "GPT2BPETokenizer":
        hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(data["vocab_file"],
                                                                  data["merge_file"]))
        hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tokenizers.decoders.ByteLevel()
    else:   # HuggingFaceTokenizer, BertWordPiece*: already a tokenizers.Tokenizer
        hf = tokenizers.Tokenizer.from_str(tok._tok.to_str())
    for token, index in sorted(tok.added_tokens.items(), key=lambda kv: kv[1]):
        if hf.token_to_id(token) is None:
            added = hf.add_special_tokens([tokenizers.AddedToken(token, special=True)])
            if added != 1 or hf.token_to_id(token) != index:
                raise CheckpointError(f"the tokenizer's special token {token!r} (id {index}) "
                                      f"cannot keep its id in the Hugging Face tokenizer")
    return hf


def export(loaded: LoadedModel, output: str, tokenizer_overrides: Optional[dict] = None,
           log=print) -> list:
    """Write the ``MixtralForCausalLM`` folder ``output``; returns notes (e.g. no tokenizer).

    CheckpointError when the model is not a Mixtral (every reason named) or ``output`` exists
    and is not empty.
    """
    reasons = unsupported(loaded)
    if reasons:
        raise CheckpointError("this checkpoint has no Hugging Face Mixtral equivalent: "
                              + "; ".join(reasons))
    from safetensors.torch import save_file
    notes = []
    with output_folder(output) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(mixtral_config(loaded), f, indent=1)
        tensors = mixtral_state_dict(loaded)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        log(f"> wrote {len(tensors)} tensors "
            f"({sum(t.numel() for t in tensors.values()):,} parameters)")
        note = _tokenizer_files(loaded.run_config, tmp, tokenizer_overrides or {})
        if note:
            notes.append(note)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"do_sample": False}, f)
    return notes
