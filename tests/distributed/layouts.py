"""Shared machinery for layout-equivalence tests: run one training step of a model on any
(tp, pp, dp, ep) layout and compare loss and gradients with the single-process model.

The reference runs every micro-batch of the global batch in one process; a parallel run
splits the micro-batches over DP ranks, the layers over pipeline stages, weights over TP
ranks and experts over EP ranks, reduces gradients with the bucketed DDP and gathers every
gradient back to its full shape by parameter name.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from megatron_lsh.config import ModelConfig, MoEConfig
from megatron_lsh.models import build_model
from megatron_lsh.parallel.data_parallel import DistributedDataParallel
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups
from megatron_lsh.parallel.grad_norm import get_grad_norm
from megatron_lsh.parallel.layers import gather_master_weight
from megatron_lsh.parallel.p2p import PipelineP2P
from megatron_lsh.parallel.pipeline import (StageOutput, allreduce_tied_embedding_grads,
                                            forward_backward)
from megatron_lsh.parallel.random import model_parallel_seed

SEED = 1234
MICRO_BATCH = 2
NUM_MICROBATCHES = 4  # global batch = 8 sequences

TINY = dict(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
            seq_length=8, max_position_embeddings=8, vocab_size=96,
            make_vocab_size_divisible_by=32, hidden_dropout=0.0, attention_dropout=0.0)


def tiny_config(kind: str, **overrides) -> ModelConfig:
    """A model small enough for 4 CPU processes, divisible by tp and pp up to 4."""
    extra = dict(decoder_num_layers=2, num_layers=2, decoder_seq_length=4) if kind == "t5" else {}
    if kind == "swin":   # 16 px, 4 x 4 patches, windows of 2 (shifted in odd blocks), 2 stages
        extra = dict(swin_depths=(2, 2), swin_num_heads=(2, 4), img_size=16, patch_dim=4,
                     window_size=2, num_classes=5, num_channels=3)
    return ModelConfig(**{**TINY, **extra, **overrides})


def make_batches(kind: str, config: ModelConfig, seed: int = 7) -> list[dict]:
    """The global batch as NUM_MICROBATCHES micro-batches of synthetic tokens."""
    g = torch.Generator().manual_seed(seed)
    s, b, v = config.seq_length, MICRO_BATCH, config.vocab_size
    out = []
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(0, v, (b, s + 1), generator=g)
        if kind == "gpt":
            out.append(dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:],
                            loss_mask=torch.ones(b, s)))
        elif kind == "swin":
            out.append(dict(images=torch.randn(b, config.num_channels, config.img_size,
                                               config.img_size, generator=g),
                            labels=torch.randint(0, config.num_classes, (b,), generator=g),
                            loss_mask=torch.ones(b)))
        elif kind == "gpt-classifier":
            pad = torch.ones(b, s, dtype=torch.bool)
            pad[0, -3:] = False   # right padding: the last real token is read
            out.append(dict(input_ids=tokens[:, :-1], padding_mask=pad,
                            labels=torch.randint(0, 2, (b,), generator=g),
                            loss_mask=torch.ones(b)))
        elif kind == "roberta":
            pad = torch.ones(b, s, dtype=torch.bool)
            pad[0, -2:] = False  # some padding, to exercise the mask
            loss_mask = (torch.rand(b, s, generator=g) < 0.4).float() * pad
            loss_mask[:, 0] = 1.0
            out.append(dict(input_ids=tokens[:, :-1], padding_mask=pad,
                            labels=tokens[:, 1:], loss_mask=loss_mask))
        else:
            sd = config.decoder_seq_length
            pad = torch.ones(b, s, dtype=torch.bool)
            pad[1, -3:] = False
            dec = torch.randint(0, v, (b, sd + 1), generator=g)
            out.append(dict(encoder_input_ids=tokens[:, :-1], encoder_padding_mask=pad,
                            decoder_input_ids=dec[:, :-1], labels=dec[:, 1:],
                            loss_mask=torch.ones(b, sd)))
    return out


def model_inputs(kind: str, batch: dict, hidden_states=None) -> dict:
    """Keyword arguments of the model's forward for one micro-batch."""
    keys = {"gpt": ("input_ids", "labels"),
            "gpt-classifier": ("input_ids", "padding_mask", "labels"),
            "swin": ("images", "labels"),
            "roberta": ("input_ids", "padding_mask", "labels"),
            "t5": ("encoder_input_ids", "decoder_input_ids", "encoder_padding_mask", "labels")}
    kwargs = {k: batch[k] for k in keys[kind]}
    if hidden_states is not None:
        kwargs["hidden_states"] = hidden_states
    return kwargs


def masked_mean(loss_bs: torch.Tensor, mask_bs: torch.Tensor) -> torch.Tensor:
    """Mean of the per-token loss over the tokens that count."""
    return (loss_bs.float() * mask_bs).sum() / mask_bs.sum()


def reference_step(kind: str, config: ModelConfig, moe: MoEConfig):
    """Single process: losses per micro-batch, gradients by name, grad norm."""
    model_parallel_seed(SEED, ProcessGroups.single())
    model = build_model(kind, config, moe, seed=SEED)
    losses = []
    for batch in make_batches(kind, config):
        out, aux = model(**model_inputs(kind, batch))
        lm = masked_mean(out, batch["loss_mask"])
        ((lm + aux) / NUM_MICROBATCHES).backward()
        losses.append(lm.item())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.sqrt(sum(g.double().square().sum() for g in grads.values())).item()
    return losses, grads, norm


def full_grad(param: torch.nn.Parameter, groups: ProcessGroups) -> torch.Tensor:
    """This parameter's gradient gathered over TP (shards) and EP (experts) to full shape."""
    grad = getattr(param, "main_grad", None)
    grad = param.grad if grad is None else grad
    if getattr(param, "tensor_model_parallel", False) and groups.tp_size > 1:
        grad = gather_master_weight(grad.contiguous(), groups.tp, param.partition_dim,
                                    getattr(param, "partition_stride", 1))
    if getattr(param, "is_expert", False) and groups.ep_size > 1:
        parts = [torch.empty_like(grad) for _ in range(groups.ep_size)]
        dist.all_gather(parts, grad.contiguous(), group=groups.ep)
        grad = torch.cat(parts, dim=0)
    return grad.clone()


def parallel_step_worker(rank, world, kind, config, moe, tp, pp, ep, sequence_parallel=False,
                         schedule="1f1b"):
    """One step on this rank's share of the layout; returns losses, full grads, grad norm."""
    dims = ParallelDims(world, tp=tp, pp=pp, ep=ep)
    groups = ProcessGroups.build(dims)
    model_parallel_seed(SEED, groups)
    model = build_model(kind, config, moe, groups, seed=SEED, sequence_parallel=sequence_parallel)
    ddp = DistributedDataParallel(model, groups, bucket_size_mb=0.01)
    batches = make_batches(kind, config)
    per_rank = NUM_MICROBATCHES // dims.dp
    mine = batches[groups.dp_rank * per_rank:(groups.dp_rank + 1) * per_rank]

    def forward_step(mb, inputs):
        batch = mine[mb]
        hidden = inputs[0] if inputs else None
        out, aux = model(**model_inputs(kind, batch, hidden))
        if not groups.is_last_stage:
            return StageOutput(outputs=[out], loss=aux)
        lm = masked_mean(out, batch["loss_mask"])
        return StageOutput(loss=lm + aux, report={"lm loss": lm.detach()})

    p2p = PipelineP2P(groups) if pp > 1 else None
    reports = forward_backward(forward_step, per_rank, groups, p2p, no_sync=ddp.no_sync,
                               schedule=schedule)
    ddp.finish_grad_sync()
    params = list(model.parameters())
    allreduce_tied_embedding_grads(params, groups)
    norm = get_grad_norm(params, groups)
    grads = {n: full_grad(p, groups) for n, p in model.named_parameters()}
    return {"losses": [r["lm loss"].item() for r in reports], "grads": grads,
            "norm": float(norm), "dp_rank": groups.dp_rank, "last": groups.is_last_stage}


def compare_with_reference(results, ref_losses, ref_grads, ref_norm, rtol=1e-5, atol=1e-6):
    """Assert the parallel run reproduced the reference loss, every gradient and the norm."""
    by_dp: dict = {}
    for r in results:
        if r["last"]:
            by_dp.setdefault(r["dp_rank"], r["losses"])
    losses = [x for dp in sorted(by_dp) for x in by_dp[dp]]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses),
                               rtol=rtol, atol=atol)
    merged: dict = {}
    for r in results:
        for name, g in r["grads"].items():
            merged.setdefault(name, g)
    missing = sorted(set(ref_grads) - set(merged))
    assert not missing, f"parameters without a gradient in the parallel run: {missing}"
    for name, ref in ref_grads.items():
        torch.testing.assert_close(merged[name], ref, rtol=rtol, atol=atol, msg=name)
    for r in results:
        assert abs(r["norm"] - ref_norm) <= rtol * ref_norm + atol, (r["norm"], ref_norm)


def with_moe(moe: MoEConfig, **overrides) -> MoEConfig:
    """A copy of ``moe`` with some fields changed (re-validated)."""
    return replace(moe, **overrides)
