#!/usr/bin/env python
"""Fine-tuning quality dense vs LSH (the paper's Table 3 on data that can be had here).

1. Pretrain the small GPT-MoE of the quality benchmarks (``trainer_runs.SMALL_SHAPE``: 6
   layers, d 128, 8 experts every 2nd layer, EP=4 on 4 gloo processes) on the Shakespeare
   corpus with the dense all-to-all, and save it (reused when it exists).
2. Fine-tune it with ``finetune_glue.py`` on the tasks ``tools/make_glue_data.py`` builds
   (SST-2 format: human-rated movie-review snippets; CoLA format: Shakespeare lines vs
   word-shuffled ones), once per (task, all-to-all variant, seed), the variant applying to
   fine-tuning and to dev scoring.
3. Print the dev score table (mean over seeds, difference to dense per seed) next to the
   paper's Table 3 differences, and write ``results.json`` / ``results.md`` / a PNG.

Every run is cached as its ``--results-json`` under ``--out``, so an interrupted sweep goes on
where it stopped.

    .venv/bin/python bench/finetune_compare.py                 # the default plan
    .venv/bin/python bench/finetune_compare.py --quick         # tiny smoke plan
    .venv/bin/python bench/finetune_compare.py --report-only   # table of what is cached
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rate_quality import VARIANTS  # noqa: E402
from trainer_runs import REPO, data_ready, trainer_flags  # noqa: E402

PAPER = ("the paper (Table 3, GPT-MoE fine-tuned on GLUE) reports LSH within a few tenths of "
         "a point of the uncompressed model on every task")
DEFAULT_VARIANTS = ["none", "target-0.1-scaled", "lsh-L6"]
METRIC = {"SST-2": "accuracy", "CoLA": "matthews_corr"}


def pretrain(out: Path, iters: int, seed: int, data_dir: Path, tokenizer_dir: Path) -> Path:
    """The dense pretrained checkpoint folder (trained when missing)."""
    folder = out / f"pretrained-gpt-none-seed{seed}-it{iters}"
    if (folder / "latest_checkpointed_iteration.txt").exists():
        return folder
    flags = trainer_flags("gpt", VARIANTS["none"], seed=seed, iters=iters,
                          metrics=out / f"{folder.name}.jsonl", cache_dir=out / "index-cache",
                          data_dir=data_dir, tokenizer_dir=tokenizer_dir,
                          eval_interval=max(iters // 6, 10))
    run(["pretrain_gpt_moe.py", *flags, "--save", str(folder)], out / f"{folder.name}.log",
        f"pretraining {folder.name}")
    return folder


def run(script_and_flags: list, log: Path, what: str, nproc: int = 4) -> None:
    """One torchrun job; its output goes to ``log``; a failure raises with the log's tail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(REPO / script_and_flags[0]), *script_and_flags[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    print(f"[{time.strftime('%H:%M:%S')}] {what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{what} failed ({proc.returncode}); end of {log}:\n{tail}")
    print(f"[{time.strftime('%H:%M:%S')}] {what}: {time.perf_counter() - start:.0f} s",
          file=sys.stderr, flush=True)


def finetune(out: Path, pretrained: Path, task: str, variant: str, seed: int, args) -> dict:
    """One fine-tuning run's results (cached)."""
    name = f"{task}-{variant}-seed{seed}-ep{args.epochs}"
    results = out / name / "results.json"
    if not results.exists():
        (out / name).mkdir(parents=True, exist_ok=True)
        flags = ["--task", task, "--data-dir", str(args.glue_dir / task),
                 "--pretrained-checkpoint", str(pretrained), "--epochs", str(args.epochs),
                 "--results-json", str(results), "--seq-length", str(args.seq_length),
                 "--expert-model-parallel-size", "4", "--micro-batch-size",
                 str(args.global_batch // 4), "--global-batch-size", str(args.global_batch),
                 "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--lr-decay-style",
                 "linear", "--lr-warmup-fraction", "0.1", "--clip-grad", "1.0",
                 "--weight-decay", "0.01", "--seed", str(seed), "--log-interval", "50",
                 "--metrics-jsonl", str(out / name / "metrics.jsonl"),
                 "--distributed-backend", "gloo", *VARIANTS[variant]]
        run(["finetune_glue.py", *flags], out / name / "log.txt", f"fine-tuning {name}")
    record = json.loads(results.read_text())
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()
            if line.strip() and "validation" not in line]
    record["bytes_per_iter"] = sum(sum(m["bytes_fwd"] + m["bytes_bwd"] for m in r["moe"])
                                   for r in rows) / max(len(rows), 1)
    record["compression_rate"] = sum(sum(m["compression_rate"] for m in r["moe"]) / len(r["moe"])
                                     for r in rows) / max(len(rows), 1)
    record.update(variant=variant, seed=seed)
    return record


def table(records: list, tasks: list, variants: list) -> list:
    """Per (task, variant): mean / sd of the main dev metric, difference to dense per seed."""
    rows = []
    for task in tasks:
        metric = METRIC[task]
        dense = {r["seed"]: r["dev"][metric] for r in records
                 if r["task"] == task and r["variant"] == "none"}
        for variant in variants:
            mine = [r for r in records if r["task"] == task and r["variant"] == variant]
            if not mine:
                continue
            scores = [r["dev"][metric] for r in mine]
            diffs = [r["dev"][metric] - dense[r["seed"]] for r in mine if r["seed"] in dense]
            rows.append({"task": task, "metric": metric, "variant": variant,
                         "seeds": len(mine), "mean": statistics.mean(scores),
                         "sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                         "diff_vs_dense": diffs,
                         "bytes_vs_dense": (statistics.mean(r["bytes_per_iter"] for r in mine)
                                            / statistics.mean(r["bytes_per_iter"] for r in records
                                                              if r["task"] == task
                                                              and r["variant"] == "none")
                                            if dense else None)})
    return rows


def markdown(rows: list, info: str) -> str:
    """The comparison as a markdown table."""
    lines = [info, "", "| task | metric | variant | seeds | dev (mean +- sd) | vs dense, points "
             "(per seed) | a2a bytes / dense |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        diffs = " / ".join(f"{100 * d:+.1f}" for d in r["diff_vs_dense"])
        bytes_ratio = f"{r['bytes_vs_dense']:.3f}" if r["bytes_vs_dense"] else "-"
        lines.append(f"| {r['task']} | {r['metric']} | {r['variant']} | {r['seeds']} | "
                     f"{100 * r['mean']:.1f} +- {100 * r['sd']:.1f} | "
                     f"{diffs if r['variant'] != 'none' else '-'} | {bytes_ratio} |")
    lines += ["", f"For comparison: {PAPER}."]
    return "\n".join(lines) + "\n"


def plot(rows: list, path: Path) -> None:
    """Bars of the mean dev score per task and variant, sd as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({r["task"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = {r["variant"]: r for r in rows if r["task"] == task}
        xs = [v for v in variants if v in mine]
        ax.bar(range(len(xs)), [100 * mine[v]["mean"] for v in xs],
               yerr=[100 * mine[v]["sd"] for v in xs], color="tab:blue")
        ax.set_xticks(range(len(xs)), xs, rotation=20, fontsize=8)
        ax.set(title=f"{task} dev {mine[xs[0]]['metric']}", ylabel="score x 100")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench/out/finetune")
    p.add_argument("--data-dir", type=Path, default=REPO / "data/shakespeare")
    p.add_argument("--tokenizer-dir", type=Path, default=REPO / "data/tokenizer")
    p.add_argument("--glue-dir", type=Path, default=REPO / "data/glue",
                   help="tools/make_glue_data.py's output")
    p.add_argument("--tasks", nargs="+", default=["SST-2", "CoLA"], choices=sorted(METRIC))
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--pretrain-iters", type=int, default=600)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--quick", action="store_true",
                   help="smoke plan: 20 pretraining iterations, one seed, SST-2, 1 epoch")
    p.add_argument("--report-only", action="store_true", help="train nothing")
    p.add_argument("--json", action="store_true", help="print only the rows as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_iters, args.seeds, args.tasks, args.epochs = 20, [1], ["SST-2"], 1
        args.out = args.out.with_name(args.out.name + "-quick")
    problem = data_ready("gpt", args.data_dir)
    missing = [t for t in args.tasks if not (args.glue_dir / t / "train.tsv").exists()]
    if problem or missing:
        raise SystemExit(f"error: {problem or f'{args.glue_dir}/{missing[0]}/train.tsv is missing: run python tools/make_glue_data.py'}")
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    pretrained = args.out / f"pretrained-gpt-none-seed1-it{args.pretrain_iters}"
    if not args.report_only:
        pretrained = pretrain(args.out, args.pretrain_iters, 1, args.data_dir,
                              args.tokenizer_dir)
    for seed in args.seeds:
        for task in args.tasks:
            for variant in args.variants:
                name = f"{task}-{variant}-seed{seed}-ep{args.epochs}"
                if args.report_only and not (args.out / name / "results.json").exists():
                    continue
                records.append(finetune(args.out, pretrained, task, variant, seed, args))
    rows = table(records, args.tasks, args.variants)
    info = (f"Small GPT-MoE pretrained {args.pretrain_iters} iterations (dense all-to-all), "
            f"fine-tuned {args.epochs} epoch(s) per run, 4 processes EP=4, global batch "
            f"{args.global_batch}, seq {args.seq_length}, lr {args.lr}; dev scores x 100.")
    if args.json:
        print(json.dumps({"rows": rows}))
        return 0
    text = markdown(rows, info)
    print(text)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "runs": records},
                                                      indent=1))
    (args.out / "results.md").write_text(text)
    if rows:
        plot(rows, args.out / "finetune_compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
