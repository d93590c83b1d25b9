"""Layout equivalence for the MoE models: many (model, compression, layout) jobs per spawn,
and a single-process reference that reproduces how LSH clusters rows under tensor parallelism.

Builds on :mod:`tests.distributed.layouts` (one training step, gradients gathered to full
shape by name, grad norm) and adds:

* :func:`run_jobs`: the worker of one spawned process group. It runs a list of jobs in turn
  (starting 2-4 processes is the slow part on a 2-core machine) and records, per job, the MoE
  statistics of every forward on this rank (rows routed and rows sent), so a test can
  show that LSH really merged rows.
* :func:`tp_share_reference`: where LSH clusters. The dispatcher clusters the rows *one
  rank dispatches*. With tp = 1 that is every row of the micro-batches the rank holds (DP and
  PP move whole micro-batches, EP moves rows only after clustering), exactly what the
  single-process model clusters, micro-batch by micro-batch. With tp > 1 (no sequence
  parallelism) each TP rank dispatches only its share of the micro-batch's tokens
  (:func:`megatron_lsh.parallel.all_to_all.tp_share_sizes`, after routing all of them), so its
  clusters never mix rows of two shares. The reference then runs every MoE layer the same way
  in one process: route all tokens, dispatch each share separately through the layer's own
  dispatcher, concatenate. Without compression the split changes nothing, so ``none`` is
  always compared with the plain single-process model. With sequence parallelism each TP
  rank holds its sequence shard, which is the same share of the tokens.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from megatron_lsh.config import MoEConfig
from megatron_lsh.moe import MoELayer
from megatron_lsh.moe.compressors import compression
from megatron_lsh.moe.router import Routing
from megatron_lsh.parallel.all_to_all import tp_share_sizes
from tests.distributed.layouts import parallel_step_worker, reference_step, tiny_config

KINDS = ("gpt", "roberta", "t5")

MOE = MoEConfig(num_experts=4, moe_layer_freq=2, router_topk=2, aux_loss_coeff=1e-2,
                z_loss_coeff=1e-3)
"""4 experts, top-2, dropless, MoE on every 2nd layer, both router losses on."""

LSH = replace(MOE, **compression("lsh", num_hashes=3, rotation_dim=1))
"""L = 3 sign hashes: 8 buckets per expert, so a micro-batch's ~8 rows per expert do merge."""

COMPRESSIONS = {"none": MOE, "lsh": LSH}

CAST = replace(MOE, **compression("cast", dtype="bf16"))
"""Rows sent as bf16 (with the "modern" jobs: each option under every compressor)."""

MODERN_MODEL = dict(normalization="RMSNorm", position_embedding_type="rope", rotary_percent=0.5,
                    activation="swiglu", add_bias_linear=False,
                    untie_embeddings_and_output_weights=True, group_query_attention=True,
                    num_query_groups=2)
"""Mixtral / Qwen-MoE style GPT options: RMSNorm, RoPE on half of each head's channels,
SwiGLU, no biases, untied output layer, grouped-query attention (4 query heads, 2 groups)."""

MODERN_MOE = dict(moe_layer_freq=[1, 0, 1, 1], load_balancing_type="seq_aux_loss",
                  score_function="sigmoid", moe_ffn_hidden_size=48,
                  shared_expert_intermediate_size=40)
"""MoE options of today's models: a Megatron layer pattern, per-sequence load balancing,
sigmoid scores, expert width apart from the dense FFN, and a shared expert."""


def make_modern_jobs(world: int, layouts, sequence_parallel: bool = False) -> list:
    """GPT jobs with the ``MODERN_*`` options, for every compressor, on ``layouts``."""
    jobs = []
    for tp, pp, ep in layouts:
        dp = world // (tp * pp)
        for comp, base in {**COMPRESSIONS, "cast": CAST}.items():
            if comp == "cast" and tp > 1:
                # TP sums partial products in another order, so rows differ from the single
                # process in the last float bits, and rounding to bf16 can flip such a row to
                # the neighbouring bf16 value: not a layout error, but beyond rtol 1e-5.
                continue
            moe = replace(base, **MODERN_MOE)
            name = f"{layout_name(tp, pp, dp, ep)}-gpt-modern-{comp}"
            if sequence_parallel:
                moe, name = replace(moe, aux_loss_coeff=0.0), name.replace("-ep", "-sp-ep")
            jobs.append(dict(name=name, kind="gpt", compression=comp, tp=tp, pp=pp, dp=dp,
                             ep=ep, sequence_parallel=sequence_parallel, variant="modern",
                             config=tiny_config("gpt", **MODERN_MODEL), moe=moe))
    return jobs


def layout_name(tp: int, pp: int, dp: int, ep: int) -> str:
    """``tp2-pp1-dp2-ep4`` style id."""
    return f"tp{tp}-pp{pp}-dp{dp}-ep{ep}"


def make_jobs(world: int, layouts, kinds=KINDS, compressions=tuple(COMPRESSIONS),
              sequence_parallel: bool = False) -> list:
    """Every (layout, kind, compression) combination as a job dict for :func:`run_jobs`.

    With ``sequence_parallel`` the router's load-balancing loss is off: each TP rank computes
    it on its own sequence shard (as Megatron does), which is not the loss of the whole
    micro-batch that the single-process model computes. The z-loss, a mean over tokens, stays.
    """
    jobs = []
    for tp, pp, ep in layouts:
        dp = world // (tp * pp)
        for kind in kinds:
            for comp in compressions:
                moe = COMPRESSIONS[comp]
                name = f"{layout_name(tp, pp, dp, ep)}-{kind}-{comp}"
                if sequence_parallel:
                    moe, name = replace(moe, aux_loss_coeff=0.0), name.replace("-ep", "-sp-ep")
                jobs.append(dict(name=name, kind=kind, compression=comp, tp=tp, pp=pp, dp=dp,
                                 ep=ep, sequence_parallel=sequence_parallel,
                                 config=tiny_config(kind), moe=moe))
    return jobs


@contextlib.contextmanager
def _count_moe_rows(totals: dict):
    """Add up ``rows`` and ``sent_rows`` of every MoE forward on this rank while active."""
    def hook(module, args, output):
        if isinstance(module, MoELayer) and module.last_stats is not None:
            totals["rows"] += module.last_stats.rows
            totals["sent_rows"] += module.last_stats.sent_rows
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_jobs(rank: int, world: int, jobs: list) -> list:
    """Worker: one training step per job (see ``parallel_step_worker``), plus MoE row counts."""
    results = []
    for job in jobs:
        totals = {"rows": 0, "sent_rows": 0}
        with _count_moe_rows(totals):
            out = parallel_step_worker(rank, world, job["kind"], job["config"], job["moe"],
                                       job["tp"], job["pp"], job["ep"], job["sequence_parallel"])
        out.update(totals)
        results.append(out)
    return results


def _dispatch_by_share(layer: MoELayer, hidden_states: torch.Tensor, shares: int):
    """MoELayer.forward with the tokens cut into ``shares`` parts after routing (see module)."""
    shape = hidden_states.shape
    x_TH = hidden_states.reshape(-1, layer.hidden_size)
    routing = layer.router(x_TH)
    outs, start = [], 0
    for size in tp_share_sizes(x_TH.shape[0], shares):
        own = slice(start, start + size)
        start += size
        kept = None if routing.kept_TK is None else routing.kept_TK[own]
        part = Routing(routing.gates_TK[own], routing.experts_TK[own], kept,
                       routing.aux_loss, routing.z_loss)
        out_TH, layer.last_stats = layer.dispatcher(x_TH[own], part, layer.experts)
        outs.append(out_TH)
    out = torch.cat(outs, dim=0).reshape(shape)
    return out, {"aux_loss": routing.aux_loss, "z_loss": routing.z_loss}


@contextlib.contextmanager
def moe_layers_dispatch_by_share(shares: int):
    """Within the block, every MoELayer of this process dispatches ``shares`` token shares."""
    original = MoELayer.forward
    MoELayer.forward = lambda self, hidden_states: _dispatch_by_share(self, hidden_states,
                                                                      shares)
    try:
        yield
    finally:
        MoELayer.forward = original


def tp_share_reference(kind: str, moe: MoEConfig, tp: int, config=None):
    """The single-process reference a layout with tensor-parallel size ``tp`` must match.

    No compression, or tp = 1: the plain single-process step. ``lsh`` with tp > 1: the same
    step with each MoE layer clustering the ``tp`` token shares separately, as the TP ranks do
    (with sequence parallelism the shares are the sequence shards: tokens are flattened
    sequence-first, so the equal split of the flattened tokens is the split of the sequence).
    """
    config = config or tiny_config(kind)
    if moe.a2a_compression != "lsh" or tp == 1:
        return reference_step(kind, config, moe)
    with moe_layers_dispatch_by_share(tp):
        return reference_step(kind, config, moe)
