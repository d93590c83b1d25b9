"""Time to quality over seeds: how firm ``bench/time_to_quality.py``'s speedup is.

A time-to-quality ratio from one seed per run is only as firm as the seed-to-seed spread of
the curves, which on the small masked-LM recipe (where a run leaves the unigram plateau) is as
large as the differences being timed. This script trains further seeds of one dense run and
one compressed variant and reports the speedup over all of them.

The loss curve of a run does not depend on the link, only its wall-clock does, so the extra
seeds train on loopback (``bench/trainer_runs.py``: 4 ranks, the same flags, schedule and
validation points as ``time_to_quality.py``'s runs; no root needed, and other work beside them
does not change the curves) and each is timed with the step times that
``time_to_quality.py``'s emulated-cluster run of the same variant measured (its ``--out``): the
k-th validation point of every seed gets the timed run's training wall-clock at its k-th
point. Seed 1 is the timed run itself. Reported:

* per seed: the dense and variant final losses, and the variant's speedup to the dense final
  loss of the same seed (paired);
* over every (dense seed, variant seed) pair: how many reach the dense final loss and the
  speedups' median and range, so one lucky or unlucky seed cannot decide the claim;
* the mean curves over seeds: the speedup of the variant's mean curve to the dense mean
  curve's final loss (the expected curve of each recipe), and to the variant mean's own final
  loss (defined when the variant ends above dense: how much sooner it gets where it ends).

Prints tables, writes ``ttq_seeds.json`` and ``ttq_seeds.png`` under ``--out``.

    .venv/bin/python bench/ttq_seeds.py --model roberta --variant lsh-nocomp@650 --iters 500 \\
        --seeds 1 2 3 4 5 --timed bench/out/time_to_quality
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_quality import VARIANTS, parse_variant, run_dir, smooth, speedup  # noqa: E402
from trainer_runs import MODELS, REPO, cached, data_ready, load_cached, train  # noqa: E402


def timed_run(timed: Path, model: str, name: str, iters: int, *, bandwidth: float,
              micro_batch: int) -> dict:
    """The seed-1 emulated-cluster result of ``time_to_quality.py`` for one variant, or exit."""
    path = run_dir(timed, model, name, bandwidth=bandwidth, micro_batch=micro_batch,
                   iters=iters, seed=1) / "result.json"
    result = load_cached(path)
    if result is None:
        raise SystemExit(f"error: {path} is missing (or of another shape or machine): run "
                         f"bench/time_to_quality.py --model {model} --variants "
                         f"{name}@{iters} first (needs root)")
    return result


def timed_curve(timed: dict, losses: list, *, source: str) -> list:
    """``losses`` (one per validation point) on the timed run's wall-clock of those points."""
    times = [t for t, _ in timed["curve"]]
    if len(times) != len(losses):
        raise SystemExit(f"error: {source} has {len(losses)} validation points, the timed run "
                         f"{len(times)}: train both with the same --eval-interval and iterations")
    return list(zip(times, losses))


def mean_curve(curves: list) -> list:
    """Point-wise mean of curves that share their times: [(seconds, mean loss), ...]."""
    times = [t for t, _ in curves[0]]
    return [(t, statistics.fmean(c[k][1] for c in curves)) for k, t in enumerate(times)]


def summarize(dense: dict, variant: dict) -> dict:
    """The per-seed, all-pairs and mean-curve speedups of ``variant`` over ``dense``.

    ``dense`` and ``variant`` map seed -> curve [(seconds, loss), ...]; seeds present in both
    are paired.
    """
    per_seed = []
    for seed in sorted(set(dense) & set(variant)):
        per_seed.append({"seed": seed, "dense_final": dense[seed][-1][1],
                         "variant_final": variant[seed][-1][1],
                         "speedup": speedup(dense[seed], variant[seed])})
    matrix = [{"dense_seed": ds, "variant_seed": vs, "speedup": speedup(dense[ds], variant[vs])}
              for ds in sorted(dense) for vs in sorted(variant)]
    pairs = [m["speedup"] for m in matrix]
    reached = sorted(s for s in pairs if s is not None)
    d_mean, v_mean = mean_curve(list(dense.values())), mean_curve(list(variant.values()))
    return {"per_seed": per_seed,
            "pairs": {"count": len(pairs), "reached": len(reached),
                      "median_of_all": _median_with_unreached(pairs),
                      "min_reached": reached[0] if reached else None,
                      "max_reached": reached[-1] if reached else None, "matrix": matrix},
            "mean_curve": {"dense_final": smooth([v for _, v in d_mean])[-1],
                           "variant_final": smooth([v for _, v in v_mean])[-1],
                           "speedup": speedup(d_mean, v_mean),
                           "speedup_at_variant_final": speedup(
                               d_mean, v_mean, smooth([v for _, v in v_mean])[-1]),
                           "dense": d_mean, "variant": v_mean}}


def _median_with_unreached(speedups: list) -> Optional[float]:
    """Median over all pairs, a pair that never reaches the target counting as slowest (0x);
    None when that median pair is itself one that never reaches it."""
    ranked = sorted(s if s is not None else 0.0 for s in speedups)
    if not ranked:
        return None
    mid = len(ranked) // 2
    value = ranked[mid] if len(ranked) % 2 else (ranked[mid - 1] + ranked[mid]) / 2
    return value if ranked[(len(ranked) - 1) // 2] > 0 else None


def plot(dense: dict, variant: dict, labels: tuple, path: Path) -> None:
    """Every seed's smoothed curve (thin) and the mean curves (thick), the dense mean's final
    loss dashed, zoomed on the part of training where the curves separate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tops, bottoms = [], []
    styles = ((dense, labels[0], "tab:blue"), (variant, labels[1], "tab:orange"))
    for curves, label, color in styles:
        for seed, curve in sorted(curves.items()):
            losses = smooth([v for _, v in curve])
            ax.plot([t / 60 for t, _ in curve], losses, color=color, alpha=0.35, linewidth=0.8)
            tops.append(losses[len(losses) // 5])
            bottoms.append(min(losses))
        mean = mean_curve(list(curves.values()))
        losses = smooth([v for _, v in mean])
        ax.plot([t / 60 for t, _ in mean], losses, color=color, linewidth=2.2,
                label=f"{label} (mean of {len(curves)} seeds)")
        if curves is dense:
            ax.axhline(losses[-1], color="grey", linestyle="--", linewidth=0.8,
                       label="dense mean final")
    if max(tops) > min(bottoms):
        span = max(tops) - min(bottoms)
        ax.set_ylim(min(bottoms) - 0.05 * span, max(tops))
    ax.set(xlabel="training wall-clock (min)", ylabel="validation loss (smoothed)",
           title="time to quality over seeds (thin: single seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Train the missing seeds on loopback, then print and write the speedups over seeds."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="roberta")
    p.add_argument("--dense", default="none", metavar="NAME[@ITERS]")
    p.add_argument("--variant", default="lsh-nocomp@650", metavar="NAME[@ITERS]")
    p.add_argument("--iters", type=int, default=500,
                   help="iterations of a NAME without @ITERS (time_to_quality.py's --iters)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--timed", type=Path, default=REPO / "bench/out/time_to_quality",
                   help="time_to_quality.py's --out, holding the seed-1 timed runs")
    p.add_argument("--bandwidth", type=float, default=250.0,
                   help="the timed runs' bandwidth (time_to_quality.py's --bandwidth)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--data-dir", type=Path, default=REPO / "data/shakespeare")
    p.add_argument("--tokenizer-dir", type=Path, default=REPO / "data/tokenizer")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/ttq_seeds")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the seeds already cached")
    p.add_argument("--run-timeout", type=float, default=7200)
    args = p.parse_args()
    if not args.report_only:
        problem = data_ready(args.model, args.data_dir)
        if problem:
            raise SystemExit(f"error: {problem}")
    specs = [parse_variant(s, args.iters) for s in (args.dense, args.variant)]
    curves = ({}, {})
    for (name, iters), out in zip(specs, curves):
        timed = timed_run(args.timed, args.model, name, iters, bandwidth=args.bandwidth,
                          micro_batch=args.micro_batch)
        for seed in args.seeds:
            if seed == 1:
                out[seed] = [tuple(point) for point in timed["curve"]]
                continue
            kw = dict(seed=seed, iters=iters, out_dir=args.out)
            result = cached(args.model, name, **kw)
            if result is None and args.report_only:
                print(f"warning: {args.model}/{name}@{iters} seed {seed} is not cached in "
                      f"{args.out}: left out", file=sys.stderr)
                continue
            if result is None:
                result = train(args.model, name, VARIANTS[name], data_dir=args.data_dir,
                               tokenizer_dir=args.tokenizer_dir, micro_batch=args.micro_batch,
                               eval_interval=args.eval_interval, eval_iters=16,
                               timeout=args.run_timeout, **kw)
            out[seed] = timed_curve(timed, [v for _, v in result["valid"]],
                                    source=f"{args.model}/{name}@{iters} seed {seed}")
    if not curves[0] or not curves[1]:
        raise SystemExit("error: no seed of the dense run or of the variant to compare")
    report = summarize(*curves)
    labels = tuple(f"{name}@{iters}" for name, iters in specs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ttq_seeds.json").write_text(json.dumps(
        {"model": args.model, "dense": labels[0], "variant": labels[1], **report,
         "curves": {"dense": curves[0], "variant": curves[1]}}, indent=1))
    plot(*curves, labels, args.out / "ttq_seeds.png")
    fmt = lambda s: f"{s:.2f}x" if s else "not reached"  # noqa: E731
    print(f"\n{args.model}: {labels[1]} against {labels[0]}")
    print(f"{'seed':>4s} {'dense final':>11s} {'variant final':>13s} {'speedup (paired)':>17s}")
    for r in report["per_seed"]:
        print(f"{r['seed']:4d} {r['dense_final']:11.4f} {r['variant_final']:13.4f} "
              f"{fmt(r['speedup']):>17s}")
    pairs, mean = report["pairs"], report["mean_curve"]
    variant_seeds = sorted(curves[1])
    print(f"\nspeedup to each dense seed's final loss (rows: dense seed, columns: variant seed)")
    print("     " + "".join(f"{vs:>12d}" for vs in variant_seeds))
    for ds in sorted(curves[0]):
        cells = {m["variant_seed"]: m["speedup"] for m in pairs["matrix"] if m["dense_seed"] == ds}
        print(f"{ds:4d} " + "".join(f"{fmt(cells[vs]):>12s}" for vs in variant_seeds))
    print(f"all {pairs['count']} (dense seed, variant seed) pairs: {pairs['reached']} reach the "
          f"dense final loss, median {fmt(pairs['median_of_all'])}, range of those reaching "
          f"{fmt(pairs['min_reached'])} - {fmt(pairs['max_reached'])}")
    own = (fmt(mean["speedup_at_variant_final"]) if mean["variant_final"] > mean["dense_final"]
           else "below dense: dense never gets there")
    print(f"mean curves: dense {mean['dense_final']:.4f}, variant {mean['variant_final']:.4f}, "
          f"speedup {fmt(mean['speedup'])}; to the variant mean's own final loss {own}")


if __name__ == "__main__":
    main()
