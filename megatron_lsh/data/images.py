"""Image classification data in ImageNet's on-disk layout, decoded with Pillow.

``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>`` (JPEG, PNG, BMP, GIF, WebP);
classes are the sub-folder names in sorted order, so both splits must have the same ones.

Training samples are an endless, reproducible stream: sample ``i`` is image
``permutation_e[i mod N]`` of epoch ``e = i // N`` (the permutation drawn from the run's seed
and the epoch) with an augmentation drawn from ``(seed, i)`` alone, so sample ``i`` is the
same however the run was interrupted, whatever the number of loader workers: resuming at a
consumed-sample count reads exactly the batches an uninterrupted run reads. Training
augmentation is the usual ImageNet recipe (random resized crop of 8-100% of the area with
aspect ratio 3/4-4/3, horizontal flip, per-channel normalisation); evaluation resizes the
shorter side to ``size / 0.875`` and takes the centre crop. Evaluation sets are padded to
whole global batches with copies of their first image whose ``loss_mask`` is 0.
"""
from __future__ import annotations

import math
import os
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pil():
    """Pillow's ``Image`` module, or DataError saying how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading images needs Pillow: pip install pillow (the package's "
                        "[vision] extra)") from None
    return Image


class ImageFolder:
    """The (path, class index) pairs of one split folder, with the class names."""

    def __init__(self, root: str, classes: Optional[Sequence[str]] = None):
        if not os.path.isdir(root):
            raise DataError(f"image folder {root} does not exist")
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not found:
            raise DataError(f"image folder {root} has no class sub-folders")
        if classes is not None and list(found) != list(classes):
            extra = sorted(set(found) ^ set(classes))
            raise DataError(f"image folder {root} has other classes than the training folder "
                            f"(e.g. {extra[0]!r})")
        self.root, self.classes = root, found
        self.samples: List[Tuple[str, int]] = []
        for index, name in enumerate(found):
            folder = os.path.join(root, name)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(EXTENSIONS))
            if not files:
                raise DataError(f"class folder {folder} has no images ({', '.join(EXTENSIONS)})")
            self.samples += [(os.path.join(folder, f), index) for f in files]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, channels: int):
        """The image at ``index`` as a PIL image with ``channels`` (1: grey, 3: RGB)."""
        Image = _pil()
        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                return image.convert("L" if channels == 1 else "RGB")
        except (OSError, Image.UnidentifiedImageError) as error:
            raise DataError(f"cannot read image {path}: {error}") from None


def _to_tensor(image, channels: int) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    x = torch.from_numpy(array.copy()).permute(2, 0, 1)
    mean = torch.tensor((IMAGENET_MEAN if channels == 3 else (0.5,)))[:, None, None]
    std = torch.tensor((IMAGENET_STD if channels == 3 else (0.5,)))[:, None, None]
    return (x - mean) / std


def random_resized_crop_box(width: int, height: int, rng: random.Random,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a crop covering a random share ``scale`` of the area with a
    log-uniform aspect ratio in ``ratio`` (10 tries, then the centre crop of clamped ratio)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(image, size: int, channels: int, rng: random.Random,
                    min_scale: float = 0.08, hflip: bool = True) -> torch.Tensor:
    """Random resized crop (``min_scale``..100% of the area) to ``size``, random horizontal
    flip (unless not ``hflip``), normalisation."""
    Image = _pil()
    left, top, w, h = random_resized_crop_box(image.width, image.height, rng, (min_scale, 1.0))
    image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    flip = rng.random() < 0.5   # drawn either way: the stream does not depend on hflip
    if hflip and flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return _to_tensor(image, channels)


def eval_transform(image, size: int, channels: int) -> torch.Tensor:
    """Shorter side to ``size / 0.875``, centre crop ``size``, normalisation."""
    Image = _pil()
    short = int(size / 0.875)
    scale = short / min(image.width, image.height)
    image = image.resize((max(size, round(image.width * scale)),
                          max(size, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return _to_tensor(image.crop((left, top, left + size, top + size)), channels)


class ImageTrainSamples(torch.utils.data.Dataset):
    """``num_samples`` augmented training samples over the epochs of ``folder`` (see the
    module docstring)."""

    def __init__(self, folder: ImageFolder, num_samples: int, size: int, channels: int,
                 seed: int, min_scale: float = 0.08, hflip: bool = True):
        self.folder, self.num_samples = folder, num_samples
        self.size, self.channels, self.seed = size, channels, seed
        self.min_scale, self.hflip = min_scale, hflip
        self._orders: dict = {}

    def __len__(self) -> int:
        return self.num_samples

    def _image_index(self, i: int) -> int:
        epoch, offset = divmod(i, len(self.folder))
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.RandomState((self.seed + epoch) % 2 ** 32).permutation(
                len(self.folder))
            self._orders = {epoch: order}   # keep one epoch: reads are in order
        return int(order[offset])

    def __getitem__(self, i: int) -> dict:
        index = self._image_index(i)
        rng = random.Random((self.seed * 1_000_003 + i) % 2 ** 63)
        image = train_transform(self.folder.load(index, self.channels), self.size,
                                self.channels, rng, self.min_scale, self.hflip)
        return {"images": image, "labels": torch.tensor(self.folder.samples[index][1]),
                "loss_mask": torch.tensor(1.0)}


class ImageEvalSamples(torch.utils.data.Dataset):
    """Every image of ``folder`` once, centre-cropped, padded to ``length`` (dummies have
    ``loss_mask`` 0)."""

    def __init__(self, folder: ImageFolder, size: int, channels: int, length: int):
        self.folder, self.size, self.channels, self.length = folder, size, channels, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        real = i < len(self.folder)
        index = i if real else 0
        image = eval_transform(self.folder.load(index, self.channels), self.size, self.channels)
        return {"images": image, "labels": torch.tensor(self.folder.samples[index][1]),
                "loss_mask": torch.tensor(1.0 if real else 0.0)}
