"""Time per training step and peak memory of the tiny recipes: dense FFN vs MoE none vs MoE lsh.

Each configuration runs on ``--world`` gloo processes (default 4, one thread each): the MoE
variants with EP = world (and DP = world: every rank holds its own micro-batches and
``experts / world`` experts), the dense variant (the same recipe without MoE layers, i.e.
``num_experts = 0``) with DP = world. A step is a whole training step as the trainer runs it:
``zero_grad``, the pipeline ``forward_backward`` over ``--microbatches`` micro-batches of
``--micro-batch-size`` synthetic sequences (the bucketed DDP all-reduce overlapping the last
backward), ``finish_grad_sync``, the optimizer step (AdamW, clipping, grad norm across EP).

Columns of the table:

* ``ms/step``: median over the measured steps (after ``--warmup`` steps) of the slowest
  rank's step time (ranks start each step together, after a barrier); ``x dense`` is its ratio
  to the dense variant of the same recipe;
* ``peak RSS``: the largest resident set size of any rank (``ru_maxrss``), and ``+model``: how
  much of it came after the process was set up (the peak minus the RSS just before the model
  was built: parameters, gradients, optimizer state, activations, buffers);
* ``a2a MiB``: MiB all ranks send to other ranks in the expert all-to-alls (forward and
  backward) per step; ``rate``: rows sent / rows routed (1.0 without LSH).

Every configuration runs in its own set of processes (so its peak RSS is its own); with
``--rounds`` > 1 the configurations are run in turn, round after round (A B C A B C ...), and
the medians pool the rounds. Timings on a shared machine are noisy: read the ratios.

    PYTHONPATH=. .venv/bin/python bench/model_step.py              # table, bench/out/model_step.*
    PYTHONPATH=. .venv/bin/python bench/model_step.py --json --steps 4 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import replace

import psutil
import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_lsh.config import ModelConfig, MoEConfig, OptimizerConfig  # noqa: E402
from megatron_lsh.models import build_model, count_parameters, get_recipe  # noqa: E402
from megatron_lsh.models.synthetic import synthetic_batch  # noqa: E402
from megatron_lsh.moe import MoELayer  # noqa: E402
from megatron_lsh.parallel.data_parallel import DistributedDataParallel  # noqa: E402
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups  # noqa: E402
from megatron_lsh.parallel.optimizer_factory import build_optimizer  # noqa: E402
from megatron_lsh.parallel.pipeline import (  # noqa: E402
    StageOutput, allreduce_tied_embedding_grads, forward_backward)
from megatron_lsh.parallel.random import model_parallel_seed  # noqa: E402
from megatron_lsh.parallel.spawn import run_distributed  # noqa: E402

RECIPES = ("tiny-gpt-moe", "tiny-roberta-moe", "tiny-t5-moe")
VARIANTS = ("dense", "moe-none", "moe-lsh")
SEED = 1234


def variant_configs(recipe_name: str, variant: str) -> tuple[str, ModelConfig, MoEConfig]:
    """(kind, model config, MoE config) of one table row; dense = the recipe without MoE."""
    recipe = get_recipe(recipe_name)
    moe = recipe.moe()
    if variant == "dense":
        moe = MoEConfig()
    elif variant == "moe-lsh":
        moe = replace(moe, a2a_compression="lsh")
    return recipe.kind, recipe.model(), moe


def worker(rank: int, world: int, job: dict) -> dict:
    """Train one configuration for warm-up + measured steps; per-step times and MoE traffic."""
    kind, config, moe = variant_configs(job["recipe"], job["variant"])
    ep = world if moe.enabled else 1
    groups = ProcessGroups.build(ParallelDims(world, ep=ep))
    model_parallel_seed(SEED, groups)
    rss_before_model = psutil.Process().memory_info().rss
    model = build_model(kind, config, moe, groups, seed=SEED)
    ddp = DistributedDataParallel(model, groups)
    optimizer = build_optimizer(ddp, OptimizerConfig(lr=1e-3, clip_grad=1.0), groups)
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    traffic = {"rows": 0, "sent_rows": 0, "bytes": 0}
    n_mb, mbs = job["microbatches"], job["micro_batch_size"]

    def forward_step(mb, inputs, batches):
        batch = batches[mb]
        per_token, aux = ddp(**{k: v for k, v in batch.items() if k != "loss_mask"})
        for layer in moe_layers:
            s = layer.last_stats
            traffic["rows"] += s.rows
            traffic["sent_rows"] += s.sent_rows
            traffic["bytes"] += s.bytes_fwd + s.bytes_bwd
        mask = batch["loss_mask"]
        lm = (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)
        return StageOutput(loss=lm + aux, report={"lm loss": lm.detach()})

    times_ms, losses = [], []
    for step in range(job["warmup"] + job["steps"]):
        batches = [synthetic_batch(kind, config, mbs, seed=(step * world + groups.dp_rank) * n_mb
                                   + mb) for mb in range(n_mb)]
        for layer in moe_layers:
            layer.set_iteration(step)
        if step == job["warmup"]:
            traffic.update(rows=0, sent_rows=0, bytes=0)
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad()
        reports = forward_backward(lambda mb, inputs: forward_step(mb, inputs, batches), n_mb,
                                   groups, None, no_sync=ddp.no_sync)
        ddp.finish_grad_sync()
        allreduce_tied_embedding_grads(list(model.parameters()), groups)
        optimizer.step()
        elapsed = time.perf_counter() - start
        if step >= job["warmup"]:
            times_ms.append(1e3 * elapsed)
            losses.append(statistics.mean(float(r["lm loss"]) for r in reports))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    total, expert = count_parameters(model)
    return dict(times_ms=times_ms, losses=losses, peak_rss=peak_rss,
                rss_before_model=rss_before_model, params=total, expert_params=expert,
                **traffic)


def summarise(runs: dict, args: dict) -> list:
    """One table row per (recipe, variant): medians over steps, max / sums over ranks."""
    rows = []
    for recipe in args["recipes"]:
        for variant in VARIANTS:
            per_round = runs[(recipe, variant)]
            step_ms = [max(rank["times_ms"][i] for rank in ranks)
                       for ranks in per_round for i in range(args["steps"])]
            ranks = per_round[-1]
            rows.append(dict(
                recipe=recipe, variant=variant,
                params_per_rank=ranks[0]["params"],
                expert_params_per_rank=ranks[0]["expert_params"],
                ms_per_step=statistics.median(step_ms),
                ms_p10=sorted(step_ms)[len(step_ms) // 10],
                ms_p90=sorted(step_ms)[(9 * len(step_ms)) // 10],
                peak_rss_mib=max(r["peak_rss"] for r in ranks) / 2 ** 20,
                model_rss_mib=max(r["peak_rss"] - r["rss_before_model"] for r in ranks) / 2 ** 20,
                a2a_mib_per_step=sum(r["bytes"] for r in ranks) / args["steps"] / 2 ** 20,
                compression_rate=(sum(r["sent_rows"] for r in ranks)
                                  / max(1, sum(r["rows"] for r in ranks))) if variant != "dense"
                else None,
                final_lm_loss=statistics.mean(r["losses"][-1] for r in ranks)))
    return rows


def print_table(rows: list, args: dict) -> None:
    """The human-readable table."""
    print(f"training step of the tiny recipes: {args['world']} gloo ranks x 1 thread, MoE EP="
          f"{args['world']} / dense DP={args['world']}, {args['microbatches']} micro-batches x "
          f"{args['micro_batch_size']} sequences per rank, fp32; median of {args['steps']} steps "
          f"x {args['rounds']} round(s) after {args['warmup']} warm-up")
    header = (f"{'recipe':<18}{'variant':<10}{'params/rank':>12}{'ms/step':>9}{'p10-p90':>13}"
              f"{'x dense':>8}{'peak RSS':>10}{'+model':>8}{'a2a MiB':>9}{'rate':>7}")
    print(header)
    print("-" * len(header))
    dense_ms = {r["recipe"]: r["ms_per_step"] for r in rows if r["variant"] == "dense"}
    for r in rows:
        rate = "-" if r["compression_rate"] is None else f"{r['compression_rate']:.3f}"
        spread = f"{r['ms_p10']:.0f}-{r['ms_p90']:.0f}"
        ratio = r["ms_per_step"] / dense_ms[r["recipe"]]
        print(f"{r['recipe']:<18}{r['variant']:<10}{r['params_per_rank']:>12,}"
              f"{r['ms_per_step']:>9.1f}{spread:>13}{ratio:>8.2f}"
              f"{r['peak_rss_mib']:>9.0f}M{r['model_rss_mib']:>7.0f}M"
              f"{r['a2a_mib_per_step']:>9.2f}{rate:>7}")


def plot(rows: list, path: str) -> None:
    """Grouped bars: ms per step and model memory per recipe, one bar per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.8 / len(VARIANTS)
    metrics = (("ms_per_step", "ms per training step (median, slowest rank)"),
               ("model_rss_mib", "peak RSS above setup, MiB (max over ranks)"),
               ("a2a_mib_per_step", "expert all-to-all MiB per step (all ranks)"))
    for ax, (key, label) in zip(axes, metrics):
        for i, variant in enumerate(VARIANTS):
            values = [next(r[key] for r in rows if r["recipe"] == rc and r["variant"] == variant)
                      for rc in recipes]
            ax.bar([x + i * width for x in range(len(recipes))], values, width, label=variant)
        ax.set_xticks([x + width for x in range(len(recipes))])
        ax.set_xticklabels(recipes, fontsize=8)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    """Parse flags, run every configuration in its own processes, print and save the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each configuration")
    parser.add_argument("--microbatches", type=int, default=2, help="per rank and step")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "out"))
    parser.add_argument("--timeout", type=float, default=1800)
    a = parser.parse_args(argv)
    args = dict(recipes=a.recipes, world=a.world, steps=a.steps, warmup=a.warmup,
                rounds=a.rounds, microbatches=a.microbatches, micro_batch_size=a.micro_batch_size)
    runs: dict = {}
    for _ in range(a.rounds):
        for recipe in a.recipes:
            for variant in VARIANTS:
                job = dict(args, recipe=recipe, variant=variant)
                ranks = run_distributed(worker, a.world, job, timeout=a.timeout)
                runs.setdefault((recipe, variant), []).append(ranks)
    report = dict(config=args, rows=summarise(runs, args))
    plot(report["rows"], os.path.join(a.out, "model_step.png"))
    with open(os.path.join(a.out, "model_step.json"), "w") as f:
        json.dump(report, f, indent=1)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report["rows"], args)
    return report


if __name__ == "__main__":
    main()
