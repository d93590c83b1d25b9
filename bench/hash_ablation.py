"""The paper's Figure 7 on our small GPT-MoE: number of hashes, and the hash family.

Trains the small GPT-MoE of ``bench/trainer_runs.py`` with fixed-L LSH (residual
compensation, the paper's setting) for L = 2, 4, 6, 8, 10 at rotation width m = 1, and
cross-polytope against spherical-plane hashing at L = 6 with m = 2 (at m = 1 the two
families coincide: the sign of one projection), and reports each run's compression rate and
final validation loss relative to the dense run. Runs are cached under ``--out`` and shared
with ``bench/rate_quality.py`` (same folder, same keys), so points trained there are reused.

    .venv/bin/python bench/hash_ablation.py                 # 8 runs, a few minutes each
    .venv/bin/python bench/hash_ablation.py --json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_runs import REPO, data_ready, train  # noqa: E402

LSH = ["--moe-a2a-compression", "lsh"]
RUNS = {"none": ["--moe-a2a-compression", "none"]}
for _L in (2, 4, 6, 8, 10):
    RUNS[f"lsh-L{_L}"] = LSH + ["--moe-lsh-num-hashes", str(_L), "--moe-lsh-compensation",
                                "residual"]
for _family in ("cross_polytope", "spherical_plane"):
    RUNS[f"lsh-L6-m2-{_family}"] = LSH + ["--moe-lsh-num-hashes", "6", "--moe-lsh-rotation-dim",
                                          "2", "--moe-lsh-hash-type", _family,
                                          "--moe-lsh-compensation", "residual"]


def main() -> None:
    """Train (or reuse) every run, print the table, write JSON and PNG."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=REPO / "data/shakespeare")
    p.add_argument("--tokenizer-dir", type=Path, default=REPO / "data/tokenizer")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/rate_quality")
    p.add_argument("--json", action="store_true", help="print only the JSON rows on stdout")
    args = p.parse_args()
    problem = data_ready("gpt", args.data_dir)
    if problem:
        raise SystemExit(f"error: {problem}")
    results = {name: train("gpt", name, flags, seed=args.seed, iters=args.iters,
                           out_dir=args.out / "gpt", data_dir=args.data_dir,
                           tokenizer_dir=args.tokenizer_dir,
                           eval_interval=max(args.iters // 6, 10))
               for name, flags in RUNS.items()}
    dense = results["none"]["valid"][-1][1]
    rows = [{"variant": name, "compression_rate": r["compression_rate"],
             "valid_loss": r["valid"][-1][1], "vs_dense": r["valid"][-1][1] / dense - 1}
            for name, r in results.items()]
    (args.out / "hash_ablation.json").write_text(json.dumps({"rows": rows}, indent=1))
    _plot(rows, args.out / "hash_ablation.png")
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(f"\n{'variant':28s} {'rate':>7s} {'valid loss':>10s} {'vs dense':>9s}")
    for r in rows:
        print(f"{r['variant']:28s} {r['compression_rate']:7.4f} {r['valid_loss']:10.4f} "
              f"{100 * r['vs_dense']:+8.2f}%")


def _plot(rows: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    hashes = [r for r in rows if r["variant"].startswith("lsh-L") and "-m2-" not in r["variant"]]
    xs = [int(r["variant"][5:]) for r in hashes]
    ax1.plot(xs, [100 * r["vs_dense"] for r in hashes], marker="o", label="valid loss vs dense")
    ax1b = ax1.twinx()
    ax1b.plot(xs, [r["compression_rate"] for r in hashes], marker="s", color="C1",
              label="compression rate")
    ax1.set(xlabel="number of hashes L (m = 1)", ylabel="valid loss vs dense (%)")
    ax1b.set(ylabel="compression rate")
    family = [r for r in rows if "-m2-" in r["variant"]]
    ax2.bar([r["variant"].split("-m2-")[1] for r in family],
            [100 * r["vs_dense"] for r in family])
    for i, r in enumerate(family):
        ax2.annotate(f"rate {r['compression_rate']:.3f}", (i, 100 * r["vs_dense"]),
                     ha="center", fontsize=8)
    ax2.set(ylabel="valid loss vs dense (%)", title="L = 6, m = 2")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
