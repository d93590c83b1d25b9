"""The results of a fine-tuning run as files: JSON for tools, a markdown table for people.

Both are written whole (a temporary file, then a rename), so a crash never leaves half of
one; the run rewrites them after every epoch.
"""
from __future__ import annotations

import os


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown_table(results: dict, task) -> str:
    """One row per epoch: dev loss and every metric of every dev split; the best is marked."""
    splits = list(task.dev_splits)
    metrics = list(task.metrics)
    header = ["epoch", "iteration"] + [f"{split} {name}" for split in splits
                                       for name in ("loss", *metrics)]
    lines = [f"# {results['task']}: fine-tuning results "
             f"(all-to-all compression: {results['a2a_compression']})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in results["history"]:
        best = record["epoch"] == results["best_epoch"]
        cells = [f"{record['epoch']}{' (best)' if best else ''}", str(record["iteration"])]
        for split in splits:
            values = record["splits"][split]
            cells += [f"{values['loss']:.4f}"] + [f"{values[m]:.4f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    main = results["main_metric"]
    if results["best_epoch"] is not None:
        lines += ["", f"Best epoch by dev {main}: {results['best_epoch']} "
                      f"({results['dev'][main]:.4f}); {results['epochs_run']} epoch(s) run"
                      f"{', stopped early' if results['stopped_early'] else ''}."]
    return "\n".join(lines) + "\n"
