"""The paper's Figure 6 on the emulated cluster: validation loss against wall-clock time.

Trains the small GPT-MoE / RoBERTa-MoE of ``bench/trainer_runs.py`` (6 layers, d 128, 8 experts
on every 2nd layer, top-2) on 4 ranks in 2 emulated nodes (``bench/netns.py``: one network
namespace per node, tbf-limited NICs) at a bandwidth where the dense all-to-all is about 45%
of the step, once per compressor (dense, LSH with and without compensation, the target-rate
LSH, cast fp8), and reports:

* validation loss against training wall-clock time (the sum of the iterations' times, so the
  validation passes themselves do not count), Gaussian-smoothed with sigma 0.5 validation
  points, as the paper plots it;
* the speedup to reach the dense run's final (smoothed) validation loss: the dense run's
  time to it over the variant's first time at or below it (linear interpolation between
  validation points); "not reached" when a variant never gets there. ``NAME@ITERS`` trains a
  variant on a longer schedule, to see whether (and when) it gets there;
* the per-iteration speedup, and the speedup at the variant's own final loss (the dense run's
  time to that loss over the variant's), which is defined when the variant ends above dense.

Needs root (network namespaces). Each run takes 10-20 minutes on 2 cores; ``--quick`` trains
two variants for a few iterations to check the plumbing. Prints a table, writes
``time_to_quality.json`` and ``time_to_quality.png`` under ``--out``.

    sudo .venv/bin/python bench/time_to_quality.py --quick
    sudo .venv/bin/python bench/time_to_quality.py --model gpt --bandwidth 60
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emulated_cluster import launch  # noqa: E402
from netns import EmulatedCluster, NetnsError  # noqa: E402
from trainer_runs import (MODELS, REPO, SMALL_SHAPE, VALID_RE,  # noqa: E402
                          data_ready, load_cached, machine, trainer_flags)
from megatron_lsh.training.logger import read_metrics  # noqa: E402

LSH = ["--moe-a2a-compression", "lsh"]
VARIANTS = {
    "none": ["--moe-a2a-compression", "none"],
    "lsh": LSH + ["--moe-lsh-compensation", "residual"],
    "lsh-nocomp": LSH + ["--moe-lsh-compensation", "none"],
    "target-0.1-scaled": LSH + ["--moe-lsh-target-rate", "0.1", "--moe-lsh-num-hashes", "0",
                                "--moe-lsh-compensation", "scaled"],
    "cast-fp8": ["--moe-a2a-compression", "cast", "--moe-cast-dtype", "fp8"],
}


def smooth(values: list, sigma: float = 0.5) -> list:
    """Gaussian smoothing over neighbouring points (sigma in points), edges renormalised."""
    if sigma <= 0:
        return list(values)
    out = []
    for i in range(len(values)):
        weights = [math.exp(-0.5 * ((j - i) / sigma) ** 2) for j in range(len(values))]
        out.append(sum(w * v for w, v in zip(weights, values)) / sum(weights))
    return out


def time_to_reach(times: list, losses: list, target: float) -> Optional[float]:
    """First time the loss curve is at or below ``target`` (linear interpolation), or None."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return times[0]
            t0, t1, l0, l1 = times[i - 1], times[i], losses[i - 1], losses[i]
            return t0 + (t1 - t0) * (l0 - target) / (l0 - loss) if l0 != loss else t1
    return None


def speedup(dense: list, variant: list, target: Optional[float] = None) -> Optional[float]:
    """Dense time to its final smoothed loss (or ``target``) over the variant's first time there.

    Curves are lists of (seconds, loss); None when either never gets there.
    """
    d_times, d_losses = zip(*dense)
    d_smooth = smooth(list(d_losses))
    goal = d_smooth[-1] if target is None else target
    dense_t = time_to_reach(list(d_times), d_smooth, goal)
    times, losses = zip(*variant)
    mine = time_to_reach(list(times), smooth(list(losses)), goal)
    return dense_t / mine if mine and dense_t else None


def parse_variant(spec: str, default_iters: int) -> tuple:
    """``NAME`` or ``NAME@ITERS`` (train that variant for ITERS iterations) -> (name, iters)."""
    name, _, iters = spec.partition("@")
    if name not in VARIANTS:
        raise SystemExit(f"error: unknown variant {name!r} (choose from {', '.join(VARIANTS)})")
    if iters and not iters.isdigit():
        raise SystemExit(f"error: {spec!r}: the part after @ must be an iteration count")
    return name, int(iters) if iters else default_iters


def run_dir(out: Path, model: str, name: str, *, bandwidth: float, micro_batch: int,
            iters: int, seed: int) -> Path:
    """The folder one (model, variant, schedule, seed) run is cached in under ``out``."""
    seed_tag = "" if seed == 1 else f"-seed{seed}"
    return out / "runs" / f"{model}-{name}-{bandwidth:g}mbit-mb{micro_batch}-it{iters}{seed_tag}"


def run_variant(cluster, args, model: str, spec: str, port: int) -> dict:
    """Train one (model, variant) on the cluster; curve of (seconds, valid loss); cached."""
    name, iters = parse_variant(spec, args.iters)
    folder = run_dir(args.out, model, name, bandwidth=args.bandwidth,
                     micro_batch=args.micro_batch, iters=iters, seed=args.seed)
    cache = folder / "result.json"
    done = load_cached(cache)
    if done is not None:
        return done
    folder.mkdir(parents=True, exist_ok=True)
    spec, metrics = MODELS[model], folder / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    trainer_args = trainer_flags(
        model, VARIANTS[name] + ["--timing-log-level", "1"], seed=args.seed, iters=iters,
        metrics=metrics, cache_dir=args.out / "index-cache", data_dir=args.data_dir,
        tokenizer_dir=args.tokenizer_dir, nproc=args.nproc, micro_batch=args.micro_batch,
        eval_interval=args.eval_interval)
    cluster.set_bandwidth(args.bandwidth or None)
    print(f"[{time.strftime('%H:%M:%S')}] {model}/{name} at {args.bandwidth:g} Mbit/s ...",
          file=sys.stderr, flush=True)
    logs = [log.read_text(errors="replace") for log in launch(
        cluster, [str(args.code_dir / spec["script"]), *trainer_args], folder,
        nproc=args.nproc, port=port, timeout=args.run_timeout, code_dir=args.code_dir)]
    rows = read_metrics(str(metrics))   # iteration records (not validation)
    valid = [(int(i), float(v)) for log in logs for i, v in VALID_RE.findall(log)]
    elapsed, total = {0: 0.0}, 0.0
    for r in rows:
        total += r["ms_per_iter"] / 1e3
        elapsed[r["iteration"]] = total
    shares = [r["timers"]["moe_a2a"] / r["ms_per_iter"] for r in rows[len(rows) // 10:]]
    label = name if iters == args.iters else f"{name}@{iters}"
    result = {"model": model, "variant": label, "iters": iters, "bandwidth_mbit": args.bandwidth,
              "shape": SMALL_SHAPE, "seed": args.seed, "machine": machine(),
              "curve": [(elapsed[i], v) for i, v in sorted(valid)],
              "ms_per_iter": sorted(r["ms_per_iter"] for r in rows)[len(rows) // 2],
              "a2a_share": sorted(shares)[len(shares) // 2] if shares else float("nan")}
    cache.write_text(json.dumps(result))
    return result


def main() -> None:
    """Train every (model, variant), print the speedups, write JSON and PNG."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", choices=sorted(MODELS), default=["gpt", "roberta"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME[@ITERS]",
                   help=f"of {', '.join(VARIANTS)}; NAME@ITERS trains that variant for ITERS "
                        f"iterations instead of --iters (a longer schedule, to see whether and "
                        f"when it reaches the dense run's final loss)")
    p.add_argument("--bandwidth", type=float, default=250.0,
                   help="Mbit/s per node NIC, each direction (the default puts the small GPT-MoE's "
                        "dense all-to-all near 45%% of the step on this machine at the default "
                        "micro-batch)")
    p.add_argument("--micro-batch", type=int, default=16,
                   help="sequences per rank per step (tokens per step set the all-to-all's "
                        "size against the fixed-size gradient all-reduce)")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--seed", type=int, default=1,
                   help="the trainer's seed for every run (runs of seeds other than 1 are "
                        "cached apart; compare variants at one seed)")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--run-timeout", type=float, default=7200)
    p.add_argument("--data-dir", type=Path, default=REPO / "data/shakespeare")
    p.add_argument("--tokenizer-dir", type=Path, default=REPO / "data/tokenizer")
    p.add_argument("--code-dir", type=Path, default=REPO,
                   help="the checkout to run (a frozen copy keeps a long run independent of edits)")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/time_to_quality")
    p.add_argument("--quick", action="store_true", help="none and lsh, 20 iterations")
    args = p.parse_args()
    if args.quick:
        args.model, args.variants, args.iters, args.eval_interval = ["gpt"], ["none", "lsh"], 20, 10
    for model in args.model:
        problem = data_ready(model, args.data_dir)
        if problem:
            raise SystemExit(f"error: {problem}")
    results = []
    try:
        with EmulatedCluster(nodes=args.nodes, bandwidth_mbit=args.bandwidth or None) as cluster:
            port = 29600
            for model in args.model:
                for name in args.variants:
                    port += 1
                    results.append(run_variant(cluster, args, model, name, port))
    except NetnsError as error:
        raise SystemExit(f"error: {error}")
    report = summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "time_to_quality.json").write_text(json.dumps(report, indent=1))
    plot(results, args.out / "time_to_quality.png")
    print(f"\n{'model':8s} {'variant':22s} {'a2a%':>5s} {'ms/iter':>8s} {'per-it':>7s} "
          f"{'final valid':>11s} {'s to dense final':>16s} {'speedup':>8s} {'at own final':>12s}")
    for r in report["rows"]:
        reach = f"{r['seconds_to_target']:16.0f}" if r["seconds_to_target"] else f"{'not reached':>16s}"
        speed = f"{r['speedup']:7.2f}x" if r["speedup"] else f"{'-':>8s}"
        own = (f"{r['speedup_at_own_final']:11.2f}x" if r["speedup_at_own_final"]
               else f"{'-':>12s}")
        print(f"{r['model']:8s} {r['variant']:22s} {100 * r['a2a_share']:5.1f} "
              f"{r['ms_per_iter']:8.0f} {r['per_iteration_speedup']:6.2f}x "
              f"{r['final_valid']:11.4f} {reach} {speed} {own}")


def summarize(results: list) -> dict:
    """Speedup of every run to its model's dense final smoothed validation loss."""
    rows = []
    for r in results:
        dense = next(d for d in results if d["model"] == r["model"] and d["variant"] == "none")
        target = smooth([v for _, v in dense["curve"]])[-1]
        times, losses = zip(*r["curve"])
        smoothed = smooth(list(losses))
        rows.append({"model": r["model"], "variant": r["variant"], "a2a_share": r["a2a_share"],
                     "ms_per_iter": r["ms_per_iter"], "final_valid": losses[-1],
                     "target": target,
                     "seconds_to_target": time_to_reach(list(times), smoothed, target),
                     "speedup": speedup(dense["curve"], r["curve"]),
                     "per_iteration_speedup": dense["ms_per_iter"] / r["ms_per_iter"],
                     # also at the variant's own final (smoothed) loss, where dense reaches it
                     "speedup_at_own_final": speedup(dense["curve"], r["curve"], smoothed[-1])})
    return {"rows": rows, "runs": results}


def plot(results: list, path: Path) -> None:
    """Smoothed validation loss against training wall-clock, one panel per model, zoomed on
    the part of training where the curves separate, with the dense final loss marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = {"gpt": "GPT", "roberta": "RoBERTa"}
    models = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        curves = {}
        for r in results:
            if r["model"] == model and r["curve"]:
                times, losses = zip(*r["curve"])
                curves[r["variant"]] = ([t / 60 for t in times], smooth(list(losses)))
        for label, (minutes, losses) in curves.items():
            ax.plot(minutes, losses, marker=".", label=label)
        if "none" in curves:
            ax.axhline(curves["none"][1][-1], color="grey", linestyle="--", linewidth=0.8,
                       label="dense final")
        if curves:   # the first fifth of training is the common initial drop: leave it out
            top = max(losses[len(losses) // 5] for _, losses in curves.values())
            bottom = min(min(losses) for _, losses in curves.values())
            if top > bottom:
                ax.set_ylim(bottom - 0.05 * (top - bottom), top)
        ax.set(title=f"{names.get(model, model)}-MoE small, "
                     f"{results[0]['bandwidth_mbit']:g} Mbit/s per node",
               xlabel="training wall-clock (min)", ylabel="validation loss (smoothed)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
