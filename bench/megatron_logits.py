"""Megatron-core's own GPTModel on a converted checkpoint: logits on given tokens (CPU).

Run with the separate megatron-core virtual environment (see ``bench/megatron_peer.py`` for
how to make one; never install megatron-core into the project's ``.venv``)::

    PYTHONPATH=. /tmp/mcore-venv/bin/python bench/megatron_logits.py \
        --checkpoint CONVERTED_DIR --config MODEL.json --tokens TOKENS.pt --out LOGITS.pt

``MODEL.json`` is the architecture (what ``megatron_lsh.convert.megatron.megatron_flags``
describes, as a dict); the model is built with ``get_gpt_layer_local_spec`` (no Transformer
Engine), the converted ``model`` state dict is loaded with ``strict=True``, and the logits
``[b, s, V]`` of one forward are saved. ``tests/e2e/test_megatron_interop.py`` drives this.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from megatron_peer import _has_field, patch_for_cpu  # noqa: E402


def build(cfg: dict):
    """Megatron-core's GPTModel for the architecture ``cfg``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec,
                                                          get_gpt_layer_local_spec)
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel()
    swiglu = cfg["activation"] == "swiglu"
    moe = dict(num_moe_experts=cfg["num_experts"], moe_router_topk=cfg["router_topk"],
               moe_ffn_hidden_size=cfg["moe_ffn_hidden_size"],
               moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
               moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
               moe_permute_fusion=False, moe_layer_freq=cfg["moe_layer_freq"],
               moe_router_score_function=cfg["score_function"],
               moe_shared_expert_intermediate_size=cfg["shared_expert_intermediate_size"]
               ) if cfg["num_experts"] else {}
    config = TransformerConfig(
        num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], num_query_groups=cfg["num_query_groups"],
        kv_channels=cfg["kv_channels"], ffn_hidden_size=cfg["ffn_hidden_size"],
        normalization=cfg["normalization"], layernorm_epsilon=cfg["layernorm_epsilon"],
        add_bias_linear=cfg["add_bias_linear"], gated_linear_unit=swiglu,
        activation_func=torch.nn.functional.silu if swiglu else torch.nn.functional.gelu,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=True, params_dtype=torch.float32,
        **moe, **{k: False for k in ("moe_router_fusion",) if _has_field(k)})
    freq = cfg["moe_layer_freq"]
    if cfg["num_experts"] and freq != 1:   # dense and MoE layers: one spec per layer
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                          normalization=cfg["normalization"])
    else:
        spec = get_gpt_layer_local_spec(num_experts=cfg["num_experts"] or None,
                                        moe_grouped_gemm=False,
                                        normalization=cfg["normalization"])
    return GPTModel(config, transformer_layer_spec=spec, vocab_size=cfg["padded_vocab_size"],
                    max_sequence_length=cfg["max_position_embeddings"],
                    position_embedding_type=cfg["position_embedding_type"],
                    rotary_percent=cfg["rotary_percent"], rotary_base=cfg["rotary_base"],
                    share_embeddings_and_output_weights=not cfg["untie"])


def main(argv=None) -> int:
    """CLI: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag in ("--checkpoint", "--config", "--tokens", "--out"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    patch_for_cpu()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29631")
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = json.loads(Path(args.config).read_text())
    # Attention forks the CUDA RNG tracker's stream for dropout, even with dropout off and in
    # eval mode; on the CPU there is no such stream: the fork becomes a no-op.
    import contextlib

    from megatron.core import tensor_parallel
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    model = build(cfg).eval()
    latest = Path(args.checkpoint, "latest_checkpointed_iteration.txt").read_text().strip()
    shard = Path(args.checkpoint, f"iter_{int(latest):07d}", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(shard, weights_only=False)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        print(f"error: state dict mismatch: missing {missing[:5]}, unexpected "
              f"{unexpected[:5]}", file=sys.stderr)
        return 1
    tokens = torch.load(args.tokens)
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)   # True: hidden
    with torch.no_grad():
        logits = model(tokens, positions, mask)
    torch.save(logits, args.out)
    print(f"checkpoint version {state.get('checkpoint_version')}, logits {tuple(logits.shape)}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
