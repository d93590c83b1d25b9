#!/usr/bin/env python
"""Write a small real image classification set in ImageNet's folder layout.

The images are scikit-learn's handwritten digits (1,797 scans of 8 x 8 pixels, 16 grey
levels, 10 classes; the UCI "Optical Recognition of Handwritten Digits" test set), read from
``sklearn/datasets/data/digits.csv.gz`` inside the ``scikit-learn==1.7.2`` wheel (downloaded
once with ``pip download --no-deps``; scikit-learn itself is not installed). Each digit is
upscaled (bicubic) to ``--size`` pixels and written as an RGB PNG to
``OUT/{train,val}/<digit>/<n>.png``; ``--val-fraction`` of every class (stratified, from
``--seed``) goes to ``val/``.

    python tools/make_image_data.py --output-dir data/digits      # 32 px, 20% validation
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import zipfile

WHEEL = "scikit-learn==1.7.2"
MEMBER = "sklearn/datasets/data/digits.csv.gz"


class ImageDataError(ValueError):
    """A missing or unreadable input; one sentence."""


def fetch_wheel(cache_dir: str) -> str:
    """The scikit-learn wheel in ``cache_dir``, downloaded with pip when missing."""
    from megatron_lsh.data.errors import DataError
    from megatron_lsh.data.fetch import pip_download
    try:
        return pip_download(WHEEL, cache_dir, "scikit_learn-1.7.2-*.whl", source=False,
                            log=lambda m: print(m, flush=True))
    except DataError as error:
        raise ImageDataError(str(error)) from None


def read_digits(wheel: str) -> list:
    """``(8 x 8 grey levels 0..16, label)`` of every digit in the wheel's CSV."""
    with zipfile.ZipFile(wheel) as z:
        try:
            raw = z.read(MEMBER)
        except KeyError:
            raise ImageDataError(f"{wheel} has no {MEMBER}") from None
    rows = []
    for line in gzip.decompress(raw).decode().splitlines():
        values = [int(float(v)) for v in line.split(",") if v.strip()]
        if len(values) == 65:
            rows.append((values[:64], values[64]))
    if len(rows) != 1797:
        raise ImageDataError(f"{MEMBER} in {wheel} has {len(rows)} digits, expected 1797")
    return rows


def write_folders(rows: list, out: str, size: int, val_fraction: float, seed: int) -> dict:
    """PNG class folders (see the module docstring); returns the counts."""
    from PIL import Image
    by_class: dict = {}
    for i, (pixels, label) in enumerate(rows):
        by_class.setdefault(label, []).append((i, pixels))
    rng = random.Random(seed)
    counts = {"train": 0, "val": 0}
    for label, items in sorted(by_class.items()):
        rng.shuffle(items)
        n_val = round(len(items) * val_fraction)
        for split, part in (("val", items[:n_val]), ("train", items[n_val:])):
            folder = os.path.join(out, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i, pixels in part:
                image = Image.frombytes("L", (8, 8), bytes(round(v * 255 / 16) for v in pixels))
                image.resize((size, size), Image.BICUBIC).convert("RGB").save(
                    os.path.join(folder, f"{i:04d}.png"))
                counts[split] += 1
    return counts


def main(argv=None) -> int:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="data/digits")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--size", type=int, default=32, help="side of the written images, pixels")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
        print(f"error: {args.output_dir} exists and is not empty", file=sys.stderr)
        return 1
    tmp = args.output_dir.rstrip("/") + ".tmp"
    try:
        counts = write_folders(read_digits(fetch_wheel(args.cache_dir)), tmp, args.size,
                               args.val_fraction, args.seed)
    except (ImageDataError, OSError, zipfile.BadZipFile) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"source": f"{WHEEL} {MEMBER}", "size": args.size, **counts}, f, indent=1)
    if os.path.isdir(args.output_dir):
        os.rmdir(args.output_dir)
    os.replace(tmp, args.output_dir)
    print(f"{args.output_dir}: {counts['train']} train / {counts['val']} val images of 10 "
          f"digits, {args.size} px", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
