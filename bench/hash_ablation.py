"""The paper's Figure 7 on our small GPT-MoE: number of hashes, and the hash family.

Trains the small GPT-MoE of ``bench/trainer_runs.py`` with fixed-L LSH for L = 2, 4, 6, 8, 10
at rotation width m = 1, and cross-polytope against spherical-plane hashing at equal bucket
capacity, and reports each run's compression rate and final validation loss relative to the
dense run.

Why those family points: at m = 1 both families are the sign of one projection, and at m = 2
they are the same too in distribution (cross-polytope's four 90-degree cones around +-e1,
+-e2 are spherical-plane's quadrants turned by 45 degrees, and the rotation is random).
They differ from m = 3 on: cross-polytope has 2m codes per function, spherical-plane 2^m
(m sign bits, i.e. SimHash). So the comparison is cross-polytope m = 4, L = 2 against
spherical-plane m = 3, L = 2: both at most 8^2 = 64 buckets per expert, the capacity of the
m = 1, L = 6 default.

``--compensation none`` (the default, the framework's) or ``residual`` (the paper's, which
over-corrects on these models: docs/RATE_QUALITY.md). Runs are cached under ``--out`` and shared
with ``bench/rate_quality.py`` (same folder, same keys: ``lsh-L6-nocomp`` is the same run
in both), so points trained there are reused.

    .venv/bin/python bench/hash_ablation.py                 # 8 runs, ~6-10 min each
    .venv/bin/python bench/hash_ablation.py --compensation residual
    .venv/bin/python bench/hash_ablation.py --report-only --json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_runs import REPO, cached, data_ready, train  # noqa: E402

FAMILIES = {"cp-m4-L2": ("cross_polytope", 4, 2), "sp-m3-L2": ("spherical_plane", 3, 2)}
"""Family points: (hash type, rotation width m, functions L), 64 buckets per expert each."""


def runs(compensation: str) -> dict:
    """``{name: trainer flags}`` of the ablation with ``compensation``; names as in
    ``bench/rate_quality.py`` (``-nocomp`` for none, no suffix for residual)."""
    suffix = {"none": "-nocomp", "residual": ""}[compensation]
    lsh = ["--moe-a2a-compression", "lsh", "--moe-lsh-compensation", compensation]
    out = {"none": ["--moe-a2a-compression", "none"]}
    for hashes in (2, 4, 6, 8, 10):
        out[f"lsh-L{hashes}{suffix}"] = lsh + ["--moe-lsh-num-hashes", str(hashes)]
    for tag, (family, width, hashes) in FAMILIES.items():
        out[f"lsh-{tag}{suffix}"] = lsh + ["--moe-lsh-num-hashes", str(hashes),
                                           "--moe-lsh-rotation-dim", str(width),
                                           "--moe-lsh-hash-type", family]
    return out


def main() -> None:
    """Train (or reuse) every run, print the table, write JSON and PNG."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compensation", choices=["none", "residual"], default="none")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=REPO / "data/shakespeare")
    p.add_argument("--tokenizer-dir", type=Path, default=REPO / "data/tokenizer")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/rate_quality")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the runs that are already cached")
    p.add_argument("--json", action="store_true", help="print only the JSON rows on stdout")
    args = p.parse_args()
    problem = data_ready("gpt", args.data_dir)
    if problem:
        raise SystemExit(f"error: {problem}")
    common = dict(seed=args.seed, iters=args.iters, out_dir=args.out / "gpt")
    results = {}
    for name, flags in runs(args.compensation).items():
        if args.report_only:
            done = cached("gpt", name, **common)
        else:
            done = train("gpt", name, flags, data_dir=args.data_dir,
                         tokenizer_dir=args.tokenizer_dir,
                         eval_interval=max(args.iters // 6, 10), **common)
        if done is not None:
            results[name] = done
    if "none" not in results:
        raise SystemExit(f"error: no dense run cached under {args.out / 'gpt'} "
                         f"(seed {args.seed}, {args.iters} iterations): run without --report-only")
    dense = results["none"]
    rows = [{"variant": name, "compression_rate": r["compression_rate"],
             "bytes_ratio": r["bytes_per_iter"] / dense["bytes_per_iter"],
             "valid_loss": r["valid"][-1][1],
             "vs_dense": r["valid"][-1][1] / dense["valid"][-1][1] - 1}
            for name, r in results.items()]
    report = {"compensation": args.compensation, "seed": args.seed, "iters": args.iters,
              "rows": rows}
    stem = f"hash_ablation_{args.compensation}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    _plot(rows, args.out / f"{stem}.png", args.compensation)
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(f"\n{'variant':22s} {'rate':>7s} {'bytes/dense':>11s} {'valid loss':>10s} "
          f"{'vs dense':>9s}")
    for r in rows:
        print(f"{r['variant']:22s} {r['compression_rate']:7.4f} {r['bytes_ratio']:11.4f} "
              f"{r['valid_loss']:10.4f} {100 * r['vs_dense']:+8.2f}%")
    print(f"\nJSON and plot: {args.out / stem}.{{json,png}}")


def _plot(rows: list, path: Path, compensation: str) -> None:
    """Left: loss and rate against L (m = 1); right: the two families at 64 buckets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    hashes = [r for r in rows if r["variant"].startswith("lsh-L")]
    xs = [int(r["variant"][5:].split("-")[0]) for r in hashes]
    ax1.plot(xs, [100 * r["vs_dense"] for r in hashes], marker="o", label="valid loss vs dense")
    ax1b = ax1.twinx()
    ax1b.plot(xs, [r["compression_rate"] for r in hashes], marker="s", color="C1",
              label="compression rate")
    ax1.set(xlabel="number of hashes L (m = 1)", ylabel="valid loss vs dense (%)",
            title=f"compensation {compensation}")
    ax1b.set(ylabel="compression rate")
    family = [(tag, r) for r in rows for tag in FAMILIES
              if r["variant"].startswith(f"lsh-{tag}")]
    ax2.bar([tag for tag, _ in family], [100 * r["vs_dense"] for _, r in family])
    for i, (_, r) in enumerate(family):
        ax2.annotate(f"rate {r['compression_rate']:.3f}", (i, 100 * r["vs_dense"]),
                     ha="center", fontsize=8)
    ax2.set(ylabel="valid loss vs dense (%)", title="64 buckets per expert")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
