"""pretrain_swin_moe.py end to end on small image folders in ImageNet's layout: the tiny
Swin-MoE learns a 4-class task far above chance under EP=2 with LSH, reports validation
top-1 / top-5 in the log and the metrics JSONL, resumes exactly, fine-tunes from a
checkpoint (--finetune --load), and refuses a bad folder in one sentence.

The task: 16 x 16 noise images with a bright square in one of four quadrants, the quadrant
being the class (flips are off: a mirror would move the square to another class).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.e2e.util import read_metrics, run_entry


def write_quadrant_images(root: str, per_class: int, seed: int) -> str:
    """``root/<quadrant>/<n>.png`` for quadrants q0..q3."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for q in range(4):
        folder = os.path.join(root, f"q{q}")
        os.makedirs(folder, exist_ok=True)
        for n in range(per_class):
            pixels = rng.integers(0, 120, size=(16, 16, 3), dtype=np.uint8)
            top, left = 8 * (q // 2), 8 * (q % 2)
            pixels[top + 2:top + 6, left + 2:left + 6] = 255
            Image.fromarray(pixels).save(os.path.join(folder, f"{n}.png"))
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_quadrant_images(str(root / "train"), 32, seed=0)
    write_quadrant_images(str(root / "val"), 8, seed=1)
    return str(root)


def swin_args(data: str, workdir, *extra: str, iters: int = 40) -> list:
    return ["--model-recipe", "tiny-swin-moe", "--img-size", "16", "--window-size", "2",
            "--num-classes", "4", "--data-path", data, "--crop-min-scale", "1.0", "--no-hflip",
            "--micro-batch-size", "8", "--global-batch-size", "16", "--train-iters", str(iters),
            "--lr", "2e-3", "--lr-warmup-iters", "4", "--eval-interval", "20",
            "--log-interval", "10", "--expert-model-parallel-size", "2",
            "--metrics-jsonl", os.path.join(str(workdir), "metrics.jsonl"),
            "--distributed-backend", "gloo", *extra]


def test_learns_above_chance_with_lsh_and_reports_top1_top5(images, tmp_path):
    proc = run_entry("swin", swin_args(images, tmp_path, "--moe-a2a-compression", "lsh",
                                       "--eval-interval", "40", iters=120), nproc=2)
    assert "(2 of 2 MoE layers)" in proc.stdout
    assert "valid_top1:" in proc.stdout and "valid_top5:" in proc.stdout
    validation = read_metrics(str(tmp_path / "metrics.jsonl"), "validation")
    assert [r["iteration"] for r in validation] == [0, 40, 80, 120]
    last = validation[-1]["validation"]
    assert last["valid_top1"] >= 0.75, last        # chance is 0.25
    assert last["valid_top5"] == 1.0               # 4 classes: top-5 holds every class
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert max(layer["compression_rate"] for r in rows for layer in r["moe"]) < 1.0


def test_resumes_exactly_and_fine_tunes_from_a_checkpoint(images, tmp_path):
    straight = tmp_path / "straight"
    run_entry("swin", swin_args(images, straight, "--hidden-dropout", "0.1", iters=12), nproc=2)
    ckpt = str(tmp_path / "ckpt")
    resumed = tmp_path / "resumed"
    run_entry("swin", swin_args(images, resumed, "--hidden-dropout", "0.1", "--save", ckpt,
                                "--save-interval", "6", "--exit-interval", "6", iters=12),
              nproc=2)
    run_entry("swin", swin_args(images, resumed, "--hidden-dropout", "0.1", "--save", ckpt,
                                "--load", ckpt, iters=12), nproc=2)
    losses = {name: {r["iteration"]: r["losses"] for r in read_metrics(
        str(tmp_path / name / "metrics.jsonl"))} for name in ("straight", "resumed")}
    for iteration in (7, 12):
        assert losses["resumed"][iteration] == losses["straight"][iteration]
    tuned = run_entry("swin", swin_args(images, tmp_path / "tuned", "--finetune", "--load",
                                        ckpt, "--lr", "5e-4", "--lr-warmup-iters", "1", iters=4),
                     nproc=2)
    assert "loaded model weights of iteration 12 for finetuning" in tuned.stdout


def test_a_folder_without_val_is_one_sentence(images, tmp_path):
    data = tmp_path / "only-train"
    write_quadrant_images(str(data / "train"), 2, seed=0)
    proc = run_entry("swin", swin_args(str(data), tmp_path, "--expert-model-parallel-size", "1"),
                     nproc=1, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: image folder {data}/val does not exist"], proc.stderr[-2000:]
