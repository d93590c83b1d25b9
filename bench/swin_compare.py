#!/usr/bin/env python
"""Swin-MoE dense vs LSH on a small real image set: accuracy, compression rate, bytes, speed.

Trains the tiny Swin-MoE recipe (2 stages, 4 experts in the 2nd block of each, EP=4 on 4 gloo
processes) on scikit-learn's handwritten digits upscaled to 32 px (``tools/make_image_data.py``:
1,438 train / 359 val images, 10 classes), once per (all-to-all variant, seed), with the real
``pretrain_swin_moe.py``, and reports the final validation top-1 / top-5, the all-to-all
compression rate and bytes per iteration relative to dense, and the median ms per iteration
(loopback: no slow link, so the time shows the compressor's overhead, not its gain; the
emulated-cluster benchmark measures throughput on a rate-limited link). Runs are cached under
``--out``.

    .venv/bin/python bench/swin_compare.py                  # none / lsh variants, 2 seeds
    .venv/bin/python bench/swin_compare.py --quick          # 40 iterations, one seed
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_compare import run  # noqa: E402
from rate_quality import VARIANTS  # noqa: E402
from trainer_runs import REPO  # noqa: E402

PAPER = ("the paper fine-tunes Swin-MoE-L on ImageNet-1K: top-1 84.7 dense vs 84.5 with LSH "
         "at an 11.7% compression rate, 1.28x throughput (4x8 A100)")


def train(out: Path, variant: str, seed: int, args) -> dict:
    """One run's summary (cached): validation curve, bytes, rate, ms per iteration."""
    name = f"{variant}-seed{seed}-it{args.iters}"
    metrics = out / name / "metrics.jsonl"
    summary = out / name / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    (out / name).mkdir(parents=True, exist_ok=True)
    if metrics.exists():
        metrics.unlink()
    flags = ["--model-recipe", "tiny-swin-moe", "--data-path", str(args.data),
             "--expert-model-parallel-size", "4", "--micro-batch-size", str(args.micro_batch),
             "--global-batch-size", str(4 * args.micro_batch), "--train-iters", str(args.iters),
             "--lr", str(args.lr), "--min-lr", str(args.lr / 20), "--lr-decay-style", "cosine",
             "--lr-warmup-iters", str(max(1, args.iters // 15)), "--weight-decay", "0.05",
             "--clip-grad", "5.0", "--crop-min-scale", "0.6", "--no-hflip",
             "--eval-interval", str(max(args.iters // 6, 10)), "--log-interval", "50",
             "--seed", str(seed), "--metrics-jsonl", str(metrics),
             "--distributed-backend", "gloo", *VARIANTS[variant]]
    run(["pretrain_swin_moe.py", *flags], out / name / "log.txt", f"training {name}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    valid = [r for r in rows if "validation" in r]
    train_rows = [r for r in rows if "validation" not in r]
    result = {"variant": variant, "seed": seed, "iters": args.iters,
              "valid": [(r["iteration"], r["validation"]) for r in valid],
              "top1": valid[-1]["validation"]["valid_top1"],
              "top5": valid[-1]["validation"]["valid_top5"],
              "bytes_per_iter": statistics.mean(sum(m["bytes_fwd"] + m["bytes_bwd"]
                                                    for m in r["moe"]) for r in train_rows),
              "compression_rate": statistics.mean(
                  statistics.mean(m["compression_rate"] for m in r["moe"]) for r in train_rows),
              "ms_per_iter": statistics.median(r["ms_per_iter"] for r in train_rows[5:])}
    summary.write_text(json.dumps(result))
    return result


def report(results: list, variants: list) -> tuple[list, str]:
    """Rows per variant (mean over seeds) and the markdown table."""
    dense = [r for r in results if r["variant"] == "none"]
    rows = []
    for variant in variants:
        mine = [r for r in results if r["variant"] == variant]
        if not mine:
            continue
        by_seed = {r["seed"]: r for r in dense}
        rows.append({
            "variant": variant, "seeds": len(mine),
            "top1": statistics.mean(r["top1"] for r in mine),
            "top1_sd": statistics.stdev([r["top1"] for r in mine]) if len(mine) > 1 else 0.0,
            "top5": statistics.mean(r["top5"] for r in mine),
            "diff_vs_dense": [r["top1"] - by_seed[r["seed"]]["top1"] for r in mine
                              if r["seed"] in by_seed],
            "compression_rate": statistics.mean(r["compression_rate"] for r in mine),
            "bytes_vs_dense": (statistics.mean(r["bytes_per_iter"] for r in mine)
                               / statistics.mean(r["bytes_per_iter"] for r in dense)
                               if dense else None),
            "ms_vs_dense": (statistics.mean(r["ms_per_iter"] for r in mine)
                            / statistics.mean(r["ms_per_iter"] for r in dense)
                            if dense else None)})
    lines = ["| variant | seeds | val top-1 (mean +- sd) | top-5 | vs dense, points (per seed) "
             "| compression rate | a2a bytes / dense | ms/iter / dense (loopback) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diffs = " / ".join(f"{100 * d:+.1f}" for d in r["diff_vs_dense"])
        lines.append(f"| {r['variant']} | {r['seeds']} | {100 * r['top1']:.1f} +- "
                     f"{100 * r['top1_sd']:.1f} | {100 * r['top5']:.1f} | "
                     f"{diffs if r['variant'] != 'none' else '-'} | "
                     f"{r['compression_rate']:.3f} | {r['bytes_vs_dense'] or 0:.3f} | "
                     f"{r['ms_vs_dense'] or 0:.2f} |")
    return rows, "\n".join(lines + ["", f"For comparison: {PAPER}."]) + "\n"


def main(argv=None) -> int:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench/out/swin")
    p.add_argument("--data", type=Path, default=REPO / "data/digits",
                   help="tools/make_image_data.py's output")
    p.add_argument("--variants", nargs="+", default=["none", "target-0.1-scaled", "lsh-L6"],
                   choices=sorted(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--quick", action="store_true", help="40 iterations, one seed")
    p.add_argument("--json", action="store_true", help="print only the rows as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.seeds = 40, [1]
        args.out = args.out.with_name(args.out.name + "-quick")
    if not (args.data / "train").is_dir():
        raise SystemExit(f"error: {args.data}/train is missing: run python "
                         f"tools/make_image_data.py --output-dir {args.data}")
    results = [train(args.out, v, s, args) for s in args.seeds for v in args.variants]
    rows, text = report(results, args.variants)
    if args.json:
        print(json.dumps({"rows": rows}))
        return 0
    info = (f"tiny Swin-MoE, digits 32 px, {args.iters} iterations of "
            f"{4 * args.micro_batch} images, 4 processes EP=4")
    print(info + "\n\n" + text)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "runs": results}, indent=1))
    (args.out / "results.md").write_text(info + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
