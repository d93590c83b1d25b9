"""Bucketed vs per-parameter gradient all-reduce on local gloo processes.

What a data-parallel step spends on communication, measured two ways on the same gradients of a
realistically shaped transformer (GPT-style blocks: fused QKV, projection, 4h MLP, biases and
LayerNorms, so many small tensors sit among the big ones):

* ``per-parameter``: one asynchronous all-reduce per gradient tensor (what a DDP without buckets
  does), all launched, then all waited on;
* ``bucketed``: :class:`~megatron_lsh.parallel.data_parallel.DistributedDataParallel`'s flat fp32
  buffer, one all-reduce per bucket of ``--bucket-mb`` (several sizes).

Both scale by ``1/world`` first, as DDP does. Timings alternate the methods (A B C A B C ...) in
one run, each timed between barriers as the slowest rank's wall time; the table reports medians
and the speedup over per-parameter. Backward/communication overlap is not part of this number.

    PYTHONPATH=. python bench/collectives.py                 # 4 processes, ~57M parameters
    PYTHONPATH=. python bench/collectives.py --json --reps 7 --bucket-mb 1 25 100
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lsh.parallel.data_parallel import DistributedDataParallel  # noqa: E402
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups  # noqa: E402
from megatron_lsh.parallel.spawn import run_distributed  # noqa: E402

PER_PARAM = "per-parameter"


def transformer_param_shapes(hidden: int, layers: int) -> list:
    """Parameter shapes of ``layers`` GPT blocks of width ``hidden`` plus the final LayerNorm."""
    ffn = 4 * hidden
    block = [(hidden,), (hidden,),                      # input LayerNorm weight, bias
             (3 * hidden, hidden), (3 * hidden,),       # fused QKV
             (hidden, hidden), (hidden,),               # attention output projection
             (hidden,), (hidden,),                      # post-attention LayerNorm
             (ffn, hidden), (ffn,),                     # MLP up
             (hidden, ffn), (hidden,)]                  # MLP down
    return block * layers + [(hidden,), (hidden,)]


def _worker(rank, world_size, shapes, bucket_mbs, reps, warmup):
    groups = ProcessGroups.build(ParallelDims(world_size))
    torch.manual_seed(rank)
    grads = [torch.randn(shape) for shape in shapes]
    methods = {}

    def per_param():
        handles = []
        for g in reversed(grads):           # backward order
            g.mul_(1.0 / world_size)
            handles.append(dist.all_reduce(g, async_op=True))
        for h in handles:
            h.wait()
    methods[PER_PARAM] = (per_param, len(grads))

    for mb in bucket_mbs:
        params = nn.ParameterList([nn.Parameter(torch.empty(s)) for s in shapes])
        ddp = DistributedDataParallel(params, groups, bucket_size_mb=mb)
        for p, g in zip(params, grads):
            p.main_grad.copy_(g)
        methods[f"bucketed {mb:g} MB"] = (ddp.finish_grad_sync,
                                         sum(len(b.buckets) for b in ddp.buffers))

    times = {name: [] for name in methods}
    for rep in range(warmup + reps):
        for name, (run, _) in methods.items():
            dist.barrier()
            start = time.perf_counter()
            run()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)   # the step waits for the slowest
            if rep >= warmup:
                times[name].append(float(elapsed))
    return {"times": times, "collectives": {n: c for n, (_, c) in methods.items()}}


def summarize(result: dict, numel: int, world_size: int) -> list:
    """One row per method: median/min time, algorithm bandwidth and speedup over per-parameter."""
    nbytes = numel * 4
    base = statistics.median(result["times"][PER_PARAM])
    rows = []
    for name, samples in result["times"].items():
        median = statistics.median(samples)
        rows.append({"method": name, "collectives": result["collectives"][name],
                     "median_s": median, "min_s": min(samples), "max_s": max(samples),
                     "alg_gb_per_s": nbytes / median / 1e9, "speedup": base / median,
                     "samples": samples})
    return rows


def print_table(rows: list, numel: int, tensors: int, world_size: int) -> None:
    print(f"gradient all-reduce, {world_size} gloo processes, {numel / 1e6:.1f}M fp32 params "
          f"in {tensors} tensors ({numel * 4 / 2 ** 20:.0f} MiB), medians of "
          f"{len(rows[0]['samples'])} alternating runs")
    print(f"{'method':<22}{'collectives':>12}{'median s':>11}{'min s':>9}{'max s':>9}"
          f"{'GB/s':>8}{'speedup':>9}")
    for r in rows:
        print(f"{r['method']:<22}{r['collectives']:>12}{r['median_s']:>11.3f}{r['min_s']:>9.3f}"
              f"{r['max_s']:>9.3f}{r['alg_gb_per_s']:>8.2f}{r['speedup']:>8.2f}x")


def plot(rows: list, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    med = [r["median_s"] for r in rows]
    err = [[m - r["min_s"] for m, r in zip(med, rows)], [r["max_s"] - m for m, r in zip(med, rows)]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, med, yerr=err, capsize=4,
                  color=["#b0b0b0"] + ["#4c72b0"] * (len(rows) - 1))
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['speedup']:.2f}x\n{r['collectives']} coll.",
                    (bar.get_x() + bar.get_width() / 2, r["max_s"]),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 3),
                    textcoords="offset points")
    ax.set_ylabel("gradient sync time per step (s), median, min-max")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(r["max_s"] for r in rows) * 1.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[1.0, 25.0, 100.0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"),
                        help="folder for the plot")
    args = parser.parse_args(argv)

    shapes = transformer_param_shapes(args.hidden, args.layers)
    numel = sum(torch.Size(s).numel() for s in shapes)
    results = run_distributed(_worker, args.world_size, shapes, args.bucket_mb, args.reps,
                              args.warmup, timeout=1800)
    rows = summarize(results[0], numel, args.world_size)
    title = (f"grad all-reduce: {args.world_size} gloo procs, {numel / 1e6:.1f}M params, "
             f"{len(shapes)} tensors (h={args.hidden}, {args.layers} layers)")
    png = os.path.join(args.out, "collectives.png")
    plot(rows, png, title)
    if args.json:
        print(json.dumps({"world_size": args.world_size, "numel": numel, "tensors": len(shapes),
                          "hidden": args.hidden, "layers": args.layers, "rows": rows,
                          "plot": png}, indent=2))
    else:
        print_table(rows, numel, len(shapes), args.world_size)
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
