"""The paper's analytic scalability model: how much of a step the expert all-to-all takes, and
what compressing it by a rate c buys, on the paper's clusters and as the cluster grows.

Why: the emulated cluster (``bench/emulated_cluster.py``) measures the mechanism on CPUs with
~100x slower links; this projects it to the GPUs and networks of the paper (no GPU needed).

Model (LSH-MoE, Sec. 3): per MoE layer and token, the compute is ~6 x the expert FLOPs and the
all-to-all moves the token's hidden state to k experts and back, (w-1)/w of it off the GPU::

    r = T_a2a / T_comp = FLOPs / (6 B_inter) * k / (1 + 2k) * (w - 1) / (w h)

with w GPUs, hidden size h, top-k routing, B_inter the inter-node bandwidth in bytes/s and
FLOPs the per-GPU *achieved* FLOP/s. The step is T_comp + T_a2a (all other communication
ignored); LSH scales the all-to-all by the compression rate c (centroids / rows), so::

    a2a share = r / (1 + r),      speedup = (1 + r) / (1 + c r)      (Amdahl)

Assumptions (stated, not measured):

* achieved FLOP/s: V100 35% of its 125 TFLOP/s fp16 tensor peak (44 TFLOP/s), A100 40% of
  312 TFLOP/s bf16 (125 TFLOP/s), typical of Megatron MoE training (``--v100-util``,
  ``--a100-util``);
* ``B_inter`` per GPU: the formula is per GPU. ``gpu`` reads the cluster's "100 Gb/s" as each
  GPU's own share (one NIC per GPU); ``node`` as one NIC shared by the node's 8 GPUs, i.e. 8x
  less per GPU. Both are shown; real clusters lie in between (NIC count, rail topology, and an
  all-to-all that reaches only part of the line rate);
* top-2 routing (the recipes' ``router_topk``), and the paper's speedups are time to quality,
  which also contains the convergence cost of compression; this model is per iteration;
* the model treats every GPU pair as inter-node, so at w = 8 (one node) it overstates the
  all-to-all; the curves are meant for w >= 16.

Output: a table per cluster and rate (``--rates``, default 0.05 0.1 0.2) next to the paper's
reported speedup, the a2a share and link efficiency the paper's speedup implies, and
``bench/out/scalability.png``: speedup against w = 8..128 GPUs.

    .venv/bin/python bench/scalability.py
    .venv/bin/python bench/scalability.py --rates 0.05 0.1 0.2 0.3 --json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
PEAK = {"V100": 125e12, "A100": 312e12}


@dataclass(frozen=True)
class Cluster:
    """One of the paper's training setups."""
    name: str
    gpu: str
    nodes: int
    gpus_per_node: int
    gbit: float            # inter-node bandwidth, Gb/s
    model: str
    hidden: int
    topk: int = 2
    paper_speedup: Optional[float] = None   # reported time-to-quality speedup

    @property
    def world(self) -> int:
        """GPUs in all."""
        return self.nodes * self.gpus_per_node


CLUSTERS = [
    Cluster("V100 2x8, 100 Gb/s", "V100", 2, 8, 100.0, "RoBERTa-MoE", 768, paper_speedup=1.6),
    Cluster("A100 4x8, 200 Gb/s", "A100", 4, 8, 200.0, "T5-MoE", 1024, paper_speedup=2.2),
    Cluster("A100 4x8, 200 Gb/s", "A100", 4, 8, 200.0, "GPT-MoE", 768),
]


def ratio(flops: float, bytes_per_s: float, topk: int, world: int, hidden: int) -> float:
    """r = T_a2a / T_comp of the paper's model (see the module docstring)."""
    if world < 2:
        return 0.0
    return flops / (6.0 * bytes_per_s) * topk / (1.0 + 2.0 * topk) * (world - 1) / (world * hidden)


def speedup(r: float, rate: float) -> float:
    """Per-iteration speedup when the all-to-all shrinks by ``rate``: (1 + r) / (1 + c r)."""
    return (1.0 + r) / (1.0 + rate * r)


def implied_ratio(s: float, rate: float) -> Optional[float]:
    """The r for which ``speedup(r, rate) == s`` (None when no r reaches s)."""
    denom = 1.0 - rate * s
    return (s - 1.0) / denom if denom > 0 else None


def per_gpu_bytes(c: Cluster, share: str) -> float:
    """Inter-node bytes/s per GPU: the whole NIC (``gpu``) or the node's NIC / GPUs (``node``)."""
    b = c.gbit * 1e9 / 8
    return b if share == "gpu" else b / c.gpus_per_node


def project(clusters: List[Cluster], rates: List[float], util: dict) -> List[dict]:
    """One row per cluster, bandwidth reading and compression rate."""
    rows = []
    for c in clusters:
        flops = util[c.gpu] * PEAK[c.gpu]
        for share in ("gpu", "node"):
            r = ratio(flops, per_gpu_bytes(c, share), c.topk, c.world, c.hidden)
            for rate in rates:
                row = {"cluster": c.name, "model": c.model, "hidden": c.hidden, "world": c.world,
                       "bandwidth_per_gpu": share, "achieved_tflops": flops / 1e12,
                       "r": r, "a2a_share": r / (1 + r), "rate": rate,
                       "speedup": speedup(r, rate), "paper_speedup": c.paper_speedup}
                need = implied_ratio(c.paper_speedup, rate) if c.paper_speedup else None
                row["paper_implied_a2a_share"] = need / (1 + need) if need is not None else None
                # fraction of the assumed per-GPU bandwidth the all-to-all would have to reach
                row["paper_implied_link_efficiency"] = r / need if need else None
                rows.append(row)
    return rows


def curves(clusters: List[Cluster], rates: List[float], util: dict, worlds: List[int]) -> dict:
    """Speedup against the number of GPUs, per cluster, bandwidth reading and rate."""
    out = {}
    for c in clusters:
        flops = util[c.gpu] * PEAK[c.gpu]
        for share in ("gpu", "node"):
            for rate in rates:
                key = f"{c.model} on {c.gpu} {c.gbit:g} Gb/s ({share}), c={rate:g}"
                out[key] = [speedup(ratio(flops, per_gpu_bytes(c, share), c.topk, w, c.hidden), rate)
                            for w in worlds]
    return out


def plot(data: dict, worlds: List[int], path: str) -> Optional[str]:
    """Speedup vs GPUs; None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, share in zip(axes, ("gpu", "node")):
        for key, ys in data.items():
            if f"({share})" in key:
                ax.plot(worlds, ys, marker=".", label=key.replace(f" ({share})", ""))
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set(xlabel="GPUs (w)", title=f"B_inter = link {'per GPU' if share == 'gpu' else 'per node / 8 GPUs'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("projected per-iteration speedup (LSH vs none)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    """Parse flags, project, print the table (or JSON), write the plot."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                   help="compression rates c (centroids / rows); 0.05 0.1 0.2 are always shown")
    p.add_argument("--v100-util", type=float, default=0.35, help="achieved / peak FLOP/s on V100")
    p.add_argument("--a100-util", type=float, default=0.40, help="achieved / peak FLOP/s on A100")
    p.add_argument("--plot", default=os.path.join(OUT, "scalability.png"))
    p.add_argument("--json", action="store_true", help="print the rows and curves as JSON only")
    args = p.parse_args(argv)
    if any(not 0 < c <= 1 for c in args.rates):
        print("error: every --rates value must be in (0, 1]", file=sys.stderr)
        return 2
    rates = sorted(set([0.05, 0.1, 0.2] + args.rates))
    util = {"V100": args.v100_util, "A100": args.a100_util}
    rows = project(CLUSTERS, rates, util)
    worlds = [8, 16, 32, 64, 128]
    data = curves(CLUSTERS, rates, util, worlds)
    png = plot(data, worlds, args.plot)
    if args.json:
        print(json.dumps({"clusters": [asdict(c) for c in CLUSTERS], "rows": rows,
                          "worlds": worlds, "curves": data}))
        return 0
    print(f"achieved FLOP/s: V100 {util['V100']:.0%} of 125 T, A100 {util['A100']:.0%} of 312 T; top-2\n")
    print(f"{'cluster':20s} {'model':12s} {'w':>3s} {'B/GPU':>5s} {'r':>6s} {'a2a%':>5s} {'c':>5s} "
          f"{'speedup':>7s} {'paper':>6s} {'paper needs a2a%':>16s} {'= link eff.':>11s}")
    for r in rows:
        paper = f"{r['paper_speedup']:.1f}x" if r["paper_speedup"] else "-"
        need = r["paper_implied_a2a_share"]
        eff = r["paper_implied_link_efficiency"]
        print(f"{r['cluster']:20s} {r['model']:12s} {r['world']:3d} {r['bandwidth_per_gpu']:>5s} "
              f"{r['r']:6.3f} {100 * r['a2a_share']:5.1f} {r['rate']:5.2f} {r['speedup']:6.2f}x "
              f"{paper:>6s} {('%.1f' % (100 * need)) if need is not None else '-':>16s} "
              f"{('%.0f%%' % (100 * eff)) if eff else '-':>11s}")
    print("\npaper speedups are time to quality; 'paper needs a2a%' is the dense all-to-all share at "
          "which this model gives the paper's speedup at rate c, and 'link eff.' the fraction of the "
          "assumed bandwidth the all-to-all would then reach (>100%: the model already predicts more).")
    if png:
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
