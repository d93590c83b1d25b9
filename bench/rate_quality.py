"""The rate-quality frontier: final validation loss against all-to-all bytes relative to dense.

Trains the small GPT-MoE (or RoBERTa-MoE) recipe of ``bench/trainer_runs.py`` (6 layers,
d 128, 8 experts on every 2nd layer, top-2, 4 gloo processes, EP=4) once per variant and
seed on the Shakespeare corpus, with identical data order and schedule (cosine decay to a
tenth of the peak, so the loss has flattened by the end), and reports for each variant the
final validation loss (16 fixed batches) and its a2a bytes per iteration as a fraction of the
dense (``none``) run's:

* ``none``, ``cast-bf16``, ``cast-fp8``: the baselines; ``cast-bf16c`` / ``cast-fp8c``: the
  same as deviations from each expert's mean row (``--moe-cast-dtype fp8-centered``);
* ``lsh-L{4,6,8,10}`` (residual compensation, the paper), ``...-nocomp``, ``...-scaled`` and
  ``...-linear`` (first-order): fixed-L LSH;
* ``target-R-{none,scaled,residual,linear}``: exactly ceil(R x rows) centroids per expert,
  error-driven splits from one cluster per expert, with each compensation;
* ``...-fp8`` / ``...-fp8c``: stacked, the centroids travel as fp8 (centred);
* ``...-skip1`` / ``...-skip1fp8`` (with ``--moe-first``): layer 1 is left uncompressed / cast
  to fp8 (``--moe-a2a-compression-skip-layers 1``), the rest as the variant says.

``--moe-first`` uses Megatron's ``--moe-layer-freq 2`` placement (MoE on layers 1, 3, 5, the
first seeing bare embeddings) instead of 2, 4, 6; its runs and report go to their own files.

``--branch-at N`` trains each seed's dense run once, keeping its checkpoint at iteration N,
and starts every other variant of that seed from it (the full state: weights, optimizer,
schedule, data position, random state), so a variant and its dense run share iterations
1..N exactly and differ only in what the compressor does after N. On a recipe whose runs
leave a loss plateau at seed-dependent times (the small masked LM), branching past the
plateau compares compression without that bifurcation; the runs and report are kept apart
(``-fromN``).

Results are cached per run under ``--out`` (resumable); ``--seeds`` repeats the variants
named in ``--seed-variants`` (the points that decide a claim). Prints a table, writes
``rate_quality.json`` and ``rate_quality.png`` there. Each run takes a few minutes on 2 cores.

    .venv/bin/python bench/rate_quality.py --quick                    # smoke run (~3 min)
    .venv/bin/python bench/rate_quality.py                            # the default sweep
    .venv/bin/python bench/rate_quality.py --variants none target-0.1-scaled --seeds 1 2 3
    .venv/bin/python bench/rate_quality.py --json                     # rows as JSON on stdout
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_runs import REPO, cached, checkpoint_dir, data_ready, train  # noqa: E402


def _variants() -> dict:
    lsh = ["--moe-a2a-compression", "lsh"]
    out = {"none": ["--moe-a2a-compression", "none"],
           "cast-bf16": ["--moe-a2a-compression", "cast", "--moe-cast-dtype", "bf16"],
           "cast-fp8": ["--moe-a2a-compression", "cast", "--moe-cast-dtype", "fp8"],
           "cast-bf16c": ["--moe-a2a-compression", "cast", "--moe-cast-dtype", "bf16-centered"],
           "cast-fp8c": ["--moe-a2a-compression", "cast", "--moe-cast-dtype", "fp8-centered"]}
    for L in (4, 6, 8, 10):
        out[f"lsh-L{L}"] = lsh + ["--moe-lsh-num-hashes", str(L),
                                  "--moe-lsh-compensation", "residual"]
        out[f"lsh-L{L}-nocomp"] = lsh + ["--moe-lsh-num-hashes", str(L),
                                         "--moe-lsh-compensation", "none"]
        out[f"lsh-L{L}-scaled"] = lsh + ["--moe-lsh-num-hashes", str(L),
                                         "--moe-lsh-compensation", "scaled"]
        out[f"lsh-L{L}-linear"] = lsh + ["--moe-lsh-num-hashes", str(L),
                                         "--moe-lsh-compensation", "linear"]
    for rate in ("0.05", "0.1", "0.2"):
        for comp in ("none", "scaled", "residual", "linear"):
            def target(hashes):
                return lsh + ["--moe-lsh-target-rate", rate, "--moe-lsh-num-hashes", hashes,
                              "--moe-lsh-compensation", comp]
            out[f"target-{rate}-{comp}"] = target("0")
            out[f"target-{rate}-{comp}-fp8"] = target("0") + ["--moe-lsh-wire-dtype", "fp8"]
            out[f"target-{rate}-{comp}-fp8c"] = target("0") + ["--moe-lsh-wire-dtype",
                                                               "fp8-centered"]
            out[f"target-{rate}-{comp}-lshinit"] = target("6")
    skip = ["--moe-a2a-compression-skip-layers", "1"]
    for name in [n for n in out if n.startswith(("lsh-", "target-"))]:
        out[f"{name}-skip1"] = out[name] + skip
        out[f"{name}-skip1fp8"] = out[name] + skip + ["--moe-a2a-compression-skip-dtype", "fp8"]
    return out


VARIANTS = _variants()
DEFAULT = ["none", "cast-bf16", "cast-fp8", "lsh-L4", "lsh-L6", "lsh-L8", "lsh-L6-nocomp",
           "lsh-L8-nocomp", "lsh-L10-nocomp", "target-0.05-none", "target-0.05-scaled",
           "target-0.1-none", "target-0.1-scaled", "target-0.2-none", "target-0.2-scaled",
           "target-0.1-residual", "target-0.1-scaled-fp8", "target-0.2-scaled-fp8"]


def table_rows(results: list) -> list:
    """One row per run: bytes relative to the same seed's dense run (or any dense run)."""
    dense = {r["seed"]: r for r in results if r["variant"] == "none"}
    rows = []
    for r in results:
        ref = dense.get(r["seed"]) or next(iter(dense.values()), None)
        if ref is None:
            continue
        rows.append({"variant": r["variant"], "seed": r["seed"],
                     "bytes_ratio": r["bytes_per_iter"] / ref["bytes_per_iter"],
                     "valid_loss": r["valid"][-1][1], "dense_valid_loss": ref["valid"][-1][1],
                     "compression_rate": r["compression_rate"], "ms_per_iter": r["ms_per_iter"]})
    return rows


def summary(rows: list) -> list:
    """Mean (and spread over seeds) per variant, with the loss relative to dense."""
    by_variant: dict = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    out = []
    for name, rs in by_variant.items():
        losses = [r["valid_loss"] for r in rs]
        rel = [r["valid_loss"] / r["dense_valid_loss"] - 1 for r in rs]
        out.append({"variant": name, "seeds": len(rs),
                    "bytes_ratio": statistics.mean(r["bytes_ratio"] for r in rs),
                    "valid_loss": statistics.mean(losses),
                    "valid_loss_sd": statistics.stdev(losses) if len(rs) > 1 else 0.0,
                    "vs_dense": statistics.mean(rel),
                    "ms_per_iter": statistics.mean(r["ms_per_iter"] for r in rs)})
    return sorted(out, key=lambda s: s["bytes_ratio"])


def plot(summ: list, path: Path, title: str) -> None:
    """Validation loss against byte ratio, one marker family per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    families = {"fixed-L LSH (residual)": lambda v: v.startswith("lsh-L") and v[-1].isdigit(),
                "fixed-L LSH (no comp.)": lambda v: v.startswith("lsh-L") and "nocomp" in v,
                "fixed-L LSH (scaled)": lambda v: v.startswith("lsh-L") and "scaled" in v,
                "target rate": lambda v: v.startswith("target") and "fp8" not in v,
                "target rate + fp8": lambda v: v.startswith("target") and "fp8" in v,
                "cast": lambda v: v.startswith("cast"), "none": lambda v: v == "none"}
    for label, match in families.items():
        pts = sorted((s["bytes_ratio"], s["valid_loss"], s["valid_loss_sd"], s["variant"])
                     for s in summ if match(s["variant"]))
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, label=label,
                    linestyle="-" if label.startswith("fixed") else "none")
        for x, y, _, name in pts:
            ax.annotate(name.replace("target-", "t").replace("lsh-", ""), (x, y), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    dense = [s["valid_loss"] for s in summ if s["variant"] == "none"]
    if dense:
        ax.axhline(dense[0] * 1.01, color="grey", linestyle=":", label="dense + 1%")
    ax.set(xscale="log", xlabel="a2a bytes / dense", ylabel="final validation loss", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Parse flags, run the sweep (cached), print the table, write JSON and PNG."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["gpt", "roberta"], default="gpt")
    p.add_argument("--variants", nargs="+", default=DEFAULT, choices=sorted(VARIANTS),
                   metavar="VARIANT", help=f"default: {' '.join(DEFAULT)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--seed-variants", nargs="*", default=None,
                   help="variants repeated for every --seeds value (default: all variants)")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--data-dir", type=Path, default=REPO / "data/shakespeare")
    p.add_argument("--tokenizer-dir", type=Path, default=REPO / "data/tokenizer")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/rate_quality")
    p.add_argument("--moe-first", action="store_true",
                   help="MoE on layers 1, 3, 5 (--moe-layer-freq 2) instead of 2, 4, 6")
    p.add_argument("--quick", action="store_true",
                   help="none, lsh-L6, target-0.1-scaled for 60 iterations")
    p.add_argument("--json", action="store_true", help="print only the JSON rows on stdout")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the runs of the plan that are already cached")
    p.add_argument("--save-checkpoints", action="store_true",
                   help="keep each trained run's final checkpoint (<out>/<model>/<run>-ckpt)")
    p.add_argument("--branch-at", type=int, default=None, metavar="N",
                   help="start every variant but none from its seed's dense run at iteration "
                        "N (see the module docstring)")
    args = p.parse_args()
    if args.quick:
        args.variants, args.iters, args.seeds = ["none", "lsh-L6", "target-0.1-scaled"], 60, [1]
    problem = data_ready(args.model, args.data_dir)
    if problem:
        raise SystemExit(f"error: {problem}")
    skipping = [v for v in args.variants if "-skip1" in v]
    if skipping and not args.moe_first:
        raise SystemExit(f"error: {skipping[0]} leaves layer 1 uncompressed, which is an MoE "
                         f"layer only with --moe-first")
    if args.branch_at is not None and not 0 < args.branch_at < args.iters:
        raise SystemExit(f"error: --branch-at {args.branch_at} must lie between 0 and --iters "
                         f"{args.iters}")
    placement = ["--moe-layer-freq", "2"] if args.moe_first else []
    tag = f"{args.model}_moe_first" if args.moe_first else args.model
    if args.branch_at is not None:
        tag += f"_from{args.branch_at}"
    out_dir = args.out / tag.replace("_", "-")
    first, rest = args.seeds[0], args.seeds[1:]
    repeated = args.variants if args.seed_variants is None else args.seed_variants
    plan = [(v, first) for v in args.variants] + [(v, s) for s in rest for v in repeated]
    if args.branch_at is not None:   # each seed's dense run first: the others start from it
        seeds = list(dict.fromkeys(s for _, s in plan))
        plan = [("none", s) for s in seeds] + [(v, s) for v, s in plan if v != "none"]
    results = []
    for variant, seed in plan:
        branch_at = args.branch_at if variant != "none" else None
        branch = None if branch_at is None else (
            checkpoint_dir(args.model, "none", seed=seed, iters=args.iters, out_dir=out_dir),
            branch_at)
        if args.report_only:
            done = cached(args.model, variant, seed=seed, iters=args.iters, out_dir=out_dir,
                          branch_at=branch_at)
            results += [done] if done else []
            continue
        results.append(train(args.model, variant, VARIANTS[variant] + placement, seed=seed,
                             iters=args.iters, out_dir=out_dir, data_dir=args.data_dir,
                             tokenizer_dir=args.tokenizer_dir, micro_batch=args.micro_batch,
                             eval_interval=max(args.iters // 6, 10),
                             save_checkpoint=args.save_checkpoints,
                             save_interval=args.branch_at if variant == "none" else None,
                             branch_from=branch))
    rows = table_rows(results)
    summ = summary(rows)
    report = {"model": args.model, "moe_first": args.moe_first, "iters": args.iters,
              "branch_at": args.branch_at, "rows": rows, "summary": summ}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rate_quality_{tag}.json").write_text(json.dumps(report, indent=1))
    plot(summ, args.out / f"rate_quality_{tag}.png",
         f"{args.model.upper()}-MoE small{' (MoE on layer 1)' if args.moe_first else ''}, "
         f"{args.iters} iterations"
         f"{'' if args.branch_at is None else f' (branched at {args.branch_at})'}, 4 ranks EP=4")
    if args.json:
        print(json.dumps({"rows": [{k: r[k] for k in ("variant", "bytes_ratio", "valid_loss",
                                                       "dense_valid_loss", "seed")}
                                   for r in rows]}))
        return
    print(f"\n{'variant':26s} {'seeds':>5s} {'bytes/dense':>11s} {'valid loss':>10s} "
          f"{'+-sd':>7s} {'vs dense':>8s} {'ms/iter':>8s}")
    for s in summ:
        print(f"{s['variant']:26s} {s['seeds']:5d} {s['bytes_ratio']:11.4f} "
              f"{s['valid_loss']:10.4f} {s['valid_loss_sd']:7.4f} {100 * s['vs_dense']:+7.2f}% "
              f"{s['ms_per_iter']:8.1f}")
    print(f"\nJSON and plot: {args.out}")


if __name__ == "__main__":
    main()
