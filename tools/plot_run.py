"""Pictures of one's own runs from their ``--metrics-jsonl`` files.

    python tools/plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR] [--labels A B ...]

Each RUN_DIR holds a ``metrics.jsonl`` (or is the path of one). Several runs are drawn on the
same axes, e.g. a dense and an LSH run of the same model. Written to ``--out`` (default: the
first run's folder, or for several runs their common parent):

* ``loss.png``: training loss per iteration (thin: raw, thick: moving mean over 10) and the
  validation loss at each validation pass (markers);
* ``compression.png``: the all-to-all compression rate per iteration (rows sent / rows
  routed, mean over MoE layers; 1 is uncompressed);
* ``a2a_bytes.png``: all-to-all payload bytes per iteration (forward + backward, all MoE
  layers, all ranks).

Runs without MoE layers leave the last two out. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lsh.training.logger import read_metrics  # noqa: E402


def metrics_path(run: str) -> Path:
    """The metrics file of a run folder (or the file itself)."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (give a run folder holding "
                         f"metrics.jsonl, or the file; --metrics-jsonl writes it)")
    return path


def moving_mean(values: list, window: int = 10) -> list:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def load(run: str) -> dict:
    """Iteration-wise series of one run: loss, validation, compression rate, bytes."""
    path = metrics_path(run)
    rows = [r for r in read_metrics(str(path)) if r.get("lm_loss") is not None
            and not r.get("skipped")]
    valid = [(r["iteration"], r["validation"].get("lm_loss"))
             for r in read_metrics(str(path), "validation")]
    moe = [r for r in rows if r.get("moe")]
    return {
        "iters": [r["iteration"] for r in rows],
        "loss": [r["lm_loss"] for r in rows],
        "valid": [(i, v) for i, v in valid if v is not None],
        "moe_iters": [r["iteration"] for r in moe],
        "rate": [sum(layer["compression_rate"] for layer in r["moe"]) / len(r["moe"])
                 for r in moe],
        "bytes": [sum((layer["bytes_fwd"] or 0) + (layer["bytes_bwd"] or 0)
                      for layer in r["moe"]) for r in moe],
    }


def plot(runs: dict, out: Path) -> list:
    """Write the PNGs for ``{label: series}`` into ``out``; returns the paths written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: tools/plot_run.py needs matplotlib (pip install matplotlib)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, s) in enumerate(runs.items()):
        color = f"C{i}"
        ax.plot(s["iters"], s["loss"], color=color, alpha=0.25, lw=0.8)
        ax.plot(s["iters"], moving_mean(s["loss"]), color=color, lw=1.8, label=f"{label} train")
        if s["valid"]:
            xs, ys = zip(*s["valid"])
            ax.plot(xs, ys, "o--", color=color, ms=4, lw=1, label=f"{label} validation")
    ax.set(xlabel="iteration", ylabel="lm loss", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    for key, ylabel, name in (("rate", "rows sent / rows routed", "compression.png"),
                              ("bytes", "bytes per iteration (fwd + bwd)", "a2a_bytes.png")):
        if not any(s[key] for s in runs.values()):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (label, s) in enumerate(runs.items()):
            if s[key]:
                ax.plot(s["moe_iters"], s[key], color=f"C{i}", lw=1.2, label=label)
        ax.set(xlabel="iteration", ylabel=ylabel, title=f"all-to-all {name[:-4].replace('_', ' ')}")
        if key == "rate":
            ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def main(argv=None) -> int:
    """CLI: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", help="folder for the PNGs")
    parser.add_argument("--labels", nargs="+", help="one name per run (default: folder names)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels gives {len(args.labels)} names for {len(args.runs)} runs")
    labels = args.labels or [metrics_path(r).parent.name for r in args.runs]
    runs = {label: load(run) for label, run in zip(labels, args.runs)}
    if args.out:
        out = Path(args.out)
    elif len(args.runs) == 1:
        out = metrics_path(args.runs[0]).parent
    else:
        out = Path(os.path.commonpath([str(metrics_path(r).parent.resolve()) for r in args.runs]))
    for path in plot(runs, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
