"""Convert a GPT-MoE checkpoint to Megatron-LM's ``--ckpt-format torch`` with Megatron-core names.

The output is one model-parallel shard (TP = PP = EP = 1): ``latest_checkpointed_iteration.txt``
and ``iter_XXXXXXX/mp_rank_00/model_optim_rng.pt`` holding ``model`` (the state dict of
Megatron-core's ``GPTModel`` built with the local layer spec,
``get_gpt_layer_local_spec(num_experts, moe_grouped_gemm=False)``), ``iteration`` and
``checkpoint_version = 3.0`` (what Megatron-LM writes today). Megatron-LM loads it with
``--load DIR --ckpt-format torch --no-load-optim --no-load-rng`` (plus ``--finetune`` to
restart the iteration count) and the model flags of the run, which the tool prints; its own
``tools/checkpoint`` converters reshard it for other layouts.

Names: ``attention.qkv`` is ``self_attention.linear_qkv`` with the same layout (query groups
of ``[their query heads, key, value]``), ``attention.out`` is ``linear_proj``, the norms are
``input_layernorm`` / ``pre_mlp_layernorm``, a dense SwiGLU MLP's two input projections are
stacked as ``linear_fc1`` (gate first, Megatron's order), and each expert ``e`` of the stacked
``experts.fc1_weight [E, h, f]`` becomes ``mlp.experts.local_experts.{e}.linear_fc1.weight
[f, h]`` (transposed; likewise ``fc2``). With linear biases Megatron-core's router has a bias
too; ours has none, so it is written as zeros. The optimizer state is not converted.
"""
from __future__ import annotations

import os

import torch

from megatron_lsh.convert.load import LoadedModel, output_folder
from megatron_lsh.training.checkpoint_files import CheckpointError

MEGATRON_CHECKPOINT_VERSION = 3.0


def unsupported(loaded: LoadedModel) -> list:
    """What Megatron-core's GPT model cannot take from this checkpoint (empty when fine)."""
    reasons = []
    if loaded.kind != "gpt":
        reasons.append(f"it is a {loaded.kind} model (the converter handles GPT-MoE)")
    return reasons


def megatron_state_dict(loaded: LoadedModel) -> dict:
    """Our single-process state dict under Megatron-core's GPT names."""
    m, moe = loaded.model_config, loaded.moe_config
    ours = {k: v.detach() for k, v in loaded.model.state_dict().items()
            if ".compressor." not in k}
    out = {}

    def move(src, dst, transform=None):
        for suffix in (".weight", ".bias"):
            if src + suffix in ours:
                value = ours.pop(src + suffix)
                out[dst + suffix] = transform(value) if transform else value

    move("embedding.word_embeddings", "embedding.word_embeddings")
    move("embedding.position_embeddings", "embedding.position_embeddings")
    move("decoder.final_layernorm", "decoder.final_layernorm")
    move("output_layer", "output_layer")
    for n in range(1, m.num_layers + 1):
        src, dst = f"decoder.layers.{n}.", f"decoder.layers.{n - 1}."
        move(src + "ln_attn", dst + "input_layernorm")
        move(src + "attention.qkv", dst + "self_attention.linear_qkv")
        move(src + "attention.out", dst + "self_attention.linear_proj")
        move(src + "ln_mlp", dst + "pre_mlp_layernorm")
        if src + "mlp.router.weight" in ours:
            router = ours.pop(src + "mlp.router.weight")
            out[dst + "mlp.router.weight"] = router
            if m.add_bias_linear:   # Megatron-core's router then has a bias; ours has none
                out[dst + "mlp.router.bias"] = router.new_zeros(router.shape[0])
            for key in ("fc1", "fc2"):
                weight = ours.pop(f"{src}mlp.experts.{key}_weight")
                bias = ours.pop(f"{src}mlp.experts.{key}_bias", None)
                for e in range(moe.num_experts):
                    expert = f"{dst}mlp.experts.local_experts.{e}.linear_{key}"
                    out[expert + ".weight"] = weight[e].t().contiguous()
                    if bias is not None:
                        out[expert + ".bias"] = bias[e]
            _dense_mlp(ours, out, src + "shared_expert.", dst + "mlp.shared_experts.")
        else:
            _dense_mlp(ours, out, src + "mlp.", dst + "mlp.")
    if ours:
        raise CheckpointError(f"{len(ours)} tensors have no Megatron-core name, e.g. "
                              f"{sorted(ours)[0]!r}")
    return out


def _dense_mlp(ours: dict, out: dict, src: str, dst: str) -> None:
    """A TP-style MLP: ``fc1`` (+ ``fc1_gate`` for SwiGLU) and ``fc2`` -> ``linear_fc1/2``."""
    if src + "fc1.weight" not in ours:
        return
    gate = ours.pop(src + "fc1_gate.weight", None)
    up = ours.pop(src + "fc1.weight")
    out[dst + "linear_fc1.weight"] = torch.cat([gate, up]) if gate is not None else up
    if src + "fc1.bias" in ours:
        gate_b = ours.pop(src + "fc1_gate.bias", None)
        up_b = ours.pop(src + "fc1.bias")
        out[dst + "linear_fc1.bias"] = torch.cat([gate_b, up_b]) if gate_b is not None else up_b
    out[dst + "linear_fc2.weight"] = ours.pop(src + "fc2.weight")
    if src + "fc2.bias" in ours:
        out[dst + "linear_fc2.bias"] = ours.pop(src + "fc2.bias")


def megatron_flags(loaded: LoadedModel) -> list:
    """The Megatron-LM model flags of this checkpoint's architecture."""
    m, moe = loaded.model_config, loaded.moe_config
    flags = ["--num-layers", m.num_layers, "--hidden-size", m.hidden_size,
             "--ffn-hidden-size", m.ffn_hidden_size, "--num-attention-heads",
             m.num_attention_heads, "--kv-channels", m.kv_channels, "--seq-length", m.seq_length,
             "--max-position-embeddings", m.max_position_embeddings,
             "--normalization", m.normalization, "--norm-epsilon", m.layernorm_epsilon,
             "--position-embedding-type", m.position_embedding_type,
             "--make-vocab-size-divisible-by", m.make_vocab_size_divisible_by]
    if m.position_embedding_type == "rope":
        flags += ["--rotary-base", m.rotary_base, "--rotary-percent", m.rotary_percent]
    if m.activation == "swiglu":
        flags.append("--swiglu")
    if not m.add_bias_linear:
        flags.append("--disable-bias-linear")
    if m.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    if m.num_query_groups != m.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", m.num_query_groups]
    if moe.num_experts:
        freq = moe.moe_layer_freq
        flags += ["--num-experts", moe.num_experts, "--moe-router-topk", moe.router_topk,
                  "--moe-layer-freq", freq if isinstance(freq, int) else str(list(freq)),
                  "--moe-router-score-function", moe.score_function,
                  "--moe-token-dispatcher-type", "alltoall"]
        if moe.moe_ffn_hidden_size:
            flags += ["--moe-ffn-hidden-size", moe.moe_ffn_hidden_size]
        if moe.shared_expert_intermediate_size:
            flags += ["--moe-shared-expert-intermediate-size",
                      moe.shared_expert_intermediate_size]
    return [str(f) for f in flags]


def architecture(loaded: LoadedModel) -> dict:
    """The model's architecture as plain values (JSON), what ``bench/megatron_logits.py``
    builds Megatron-core's GPTModel from."""
    from megatron_lsh.models.embedding import padded_vocab_size
    m, moe = loaded.model_config, loaded.moe_config
    return dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels, ffn_hidden_size=m.ffn_hidden_size,
        normalization=m.normalization, layernorm_epsilon=m.layernorm_epsilon,
        add_bias_linear=m.add_bias_linear, activation=m.activation,
        num_experts=moe.num_experts, router_topk=moe.router_topk,
        moe_ffn_hidden_size=moe.moe_ffn_hidden_size or m.ffn_hidden_size,
        moe_layer_freq=moe.moe_layer_freq, score_function=moe.score_function,
        shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
        padded_vocab_size=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1),
        max_position_embeddings=m.max_position_embeddings,
        position_embedding_type=m.position_embedding_type, rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base, untie=m.untie_embeddings_and_output_weights)


def convert(loaded: LoadedModel, output: str) -> str:
    """Write the Megatron-LM checkpoint folder ``output`` (atomically); returns its shard file."""
    reasons = unsupported(loaded)
    if reasons:
        raise CheckpointError("this checkpoint cannot be converted to Megatron-core: "
                              + "; ".join(reasons))
    state = {"model": megatron_state_dict(loaded), "iteration": loaded.iteration,
             "checkpoint_version": MEGATRON_CHECKPOINT_VERSION}
    with output_folder(output) as tmp:
        shard = os.path.join(tmp, f"iter_{loaded.iteration:07d}", "mp_rank_00")
        os.makedirs(shard)
        torch.save(state, os.path.join(shard, "model_optim_rng.pt"))
        with open(os.path.join(tmp, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(loaded.iteration))
    return os.path.join(output, f"iter_{loaded.iteration:07d}", "mp_rank_00",
                        "model_optim_rng.pt")
