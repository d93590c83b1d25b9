"""Loss curves of the tiny GPT-MoE on the default corpus: LSH all-to-all against none.

Runs ``pretrain_gpt_moe.py`` (torchrun, 4 gloo processes, EP=4) once per compressor on the
preprocessed Shakespeare corpus that ``examples/quickstart.sh`` prepares, with identical
seeds, data order and schedule, and plots training and validation loss against iteration.

    .venv/bin/python bench/convergence.py                 # none vs lsh, 200 iterations
    .venv/bin/python bench/convergence.py --iters 400 --variants none lsh lsh-m2 lsh-nocomp cast-fp8

Prints a table (final train loss averaged over the last 20 iterations, final validation
loss, mean compression rate, a2a bytes per iteration, ms per iteration) and writes
``docs/convergence.png`` (or ``--plot``) and a JSON of all curves next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_lsh.training.logger import read_metrics

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "none": ["--moe-a2a-compression", "none"],
    "lsh": ["--moe-a2a-compression", "lsh", "--moe-lsh-compensation", "residual"],
    "lsh-nocomp": ["--moe-a2a-compression", "lsh", "--moe-lsh-no-compensation"],
    "lsh-m2": ["--moe-a2a-compression", "lsh", "--moe-lsh-rotation-dim", "2",
               "--moe-lsh-compensation", "residual"],
    "lsh-L10": ["--moe-a2a-compression", "lsh", "--moe-lsh-num-hashes", "10",
                "--moe-lsh-compensation", "residual"],
    "cast-bf16": ["--moe-a2a-compression", "cast", "--moe-cast-dtype", "bf16"],
    "cast-fp8": ["--moe-a2a-compression", "cast", "--moe-cast-dtype", "fp8"],
}
VALID_RE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.Ee+-]+)")


def run_variant(name: str, args: argparse.Namespace, workdir: str) -> dict:
    """Train one variant; return its per-iteration metrics and validation curve."""
    data, tok = Path(args.data_dir), Path(args.tokenizer_dir)
    metrics = os.path.join(workdir, f"{name}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", str(REPO / "pretrain_gpt_moe.py"),
           "--model-recipe", "tiny-gpt-moe", "--expert-model-parallel-size", str(args.nproc),
           "--train-data-path", str(data / "train_text_document"),
           "--valid-data-path", str(data / "valid_text_document"),
           "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tok / "vocab.json"),
           "--merge-file", str(tok / "merges.txt"),
           "--data-cache-path", os.path.join(workdir, "index-cache"),
           "--micro-batch-size", "4", "--global-batch-size", str(4 * args.nproc),
           "--train-iters", str(args.iters), "--lr", "2e-3", "--min-lr", "2e-4",
           "--lr-warmup-iters", "20", "--eval-interval", str(args.eval_interval),
           "--eval-iters", "4", "--log-interval", "10", "--seed", str(args.seed),
           "--metrics-jsonl", metrics, "--distributed-backend", "gloo", *VARIANTS[name]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    print(f"[convergence] training {name} ...", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rows = read_metrics(str(metrics))   # iteration records (not validation)
    valid = [(int(i), float(v)) for i, v in VALID_RE.findall(proc.stdout)]
    return {"rows": rows, "valid": valid}


def summarize(name: str, run: dict) -> dict:
    """One table row of a variant."""
    rows = run["rows"]
    tail = rows[-20:]
    rates = [l["compression_rate"] for r in tail for l in r["moe"]]
    return {"variant": name,
            "train_loss_last20": sum(r["lm_loss"] for r in tail) / len(tail),
            "valid_loss_final": run["valid"][-1][1] if run["valid"] else float("nan"),
            "valid_loss_start": run["valid"][0][1] if run["valid"] else float("nan"),
            "compression_rate": sum(rates) / max(len(rates), 1),
            "bytes_per_iter": sum(sum(l["bytes_fwd"] + l["bytes_bwd"] for l in r["moe"])
                                  for r in tail) / len(tail),
            "ms_per_iter": sorted(r["ms_per_iter"] for r in tail)[len(tail) // 2]}


def plot(runs: dict, path: str) -> None:
    """Training (smoothed) and validation loss against iteration, one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        its = [r["iteration"] for r in run["rows"]]
        loss = [r["lm_loss"] for r in run["rows"]]
        k = 10
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1])
                  for i in range(len(loss))]
        ax1.plot(its, smooth, label=name)
        if run["valid"]:
            ax2.plot(*zip(*run["valid"]), marker="o", label=name)
    ax1.set(title="training lm loss (10-iteration mean)", xlabel="iteration", ylabel="loss")
    ax2.set(title="validation lm loss", xlabel="iteration", ylabel="loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("tiny GPT-MoE on Shakespeare, 4 gloo processes, EP=4")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    """Parse flags, train every variant, print the table, write plot and JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["none", "lsh"], choices=sorted(VARIANTS))
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-dir", default=str(REPO / "data/shakespeare"))
    p.add_argument("--tokenizer-dir", default=str(REPO / "data/tokenizer"))
    p.add_argument("--plot", default=str(REPO / "docs/convergence.png"))
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    args = p.parse_args()
    if not (Path(args.data_dir) / "train_text_document.idx").exists():
        raise SystemExit(f"error: {args.data_dir}/train_text_document.idx is missing: run "
                         f"examples/quickstart.sh once to prepare the default corpus")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="convergence_") as workdir:
        for name in args.variants:
            runs[name] = run_variant(name, args, workdir)
    table = [summarize(n, r) for n, r in runs.items()]
    if args.json:
        print(json.dumps({"rows": table}, indent=1))
    else:
        print(f"\n{'variant':12s} {'train(last20)':>13s} {'valid start':>11s} {'valid end':>9s} "
              f"{'rate':>6s} {'a2a bytes/iter':>14s} {'ms/iter':>8s}")
        for t in table:
            print(f"{t['variant']:12s} {t['train_loss_last20']:13.4f} {t['valid_loss_start']:11.4f} "
                  f"{t['valid_loss_final']:9.4f} {t['compression_rate']:6.3f} "
                  f"{t['bytes_per_iter']:14,.0f} {t['ms_per_iter']:8.1f}")
    plot(runs, args.plot)
    with open(os.path.splitext(args.plot)[0] + ".json", "w") as f:
        json.dump({"table": table, "curves": {n: {"train": [(r["iteration"], r["lm_loss"])
                                                            for r in run["rows"]],
                                                  "valid": run["valid"]}
                                              for n, run in runs.items()}}, f)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
