"""Image classification data of a run: ``--data-path DIR`` holding ``train/`` and ``val/``
class folders (:mod:`megatron_lsh.data.images`), and this rank's micro-batches of them.

Training reads ``train_iters x global batch`` augmented samples in order from the consumed
sample count (so a resumed run continues exactly); every validation pass reads the whole
``val/`` folder once, padded to whole global batches (padding samples do not count).
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Optional

from megatron_lsh.config import ConfigError, MegatronLSHConfig
from megatron_lsh.data.sampler import iterate_keeping_rng
from megatron_lsh.parallel.dims import ProcessGroups


class ImageRunData:
    """Train / validation image sets of a run and iterators over this DP rank's share."""

    def __init__(self, config: MegatronLSHConfig, groups: ProcessGroups,
                 global_batch_size: int, log: Callable[[str], None] = print):
        from megatron_lsh.data.images import ImageEvalSamples, ImageFolder, ImageTrainSamples

        paths = config.data.data_path
        if len(paths) != 1:
            raise ConfigError(f"image classification takes one --data-path DIR holding train/ "
                              f"and val/ class folders, got {len(paths)} paths")
        root = paths[0]
        m, tr = config.model, config.training
        train = ImageFolder(os.path.join(root, "train"))
        val = ImageFolder(os.path.join(root, "val"), classes=train.classes)
        if len(train.classes) != m.num_classes:
            raise ConfigError(f"--num-classes is {m.num_classes} but {root}/train has "
                              f"{len(train.classes)} class folders")
        log(f"> images: {len(train)} train and {len(val)} validation images of "
            f"{len(train.classes)} classes in {root}, {m.img_size} px")
        self.config, self.groups, self.global_batch_size = config, groups, global_batch_size
        self.train = ImageTrainSamples(train, tr.train_iters * global_batch_size, m.img_size,
                                       m.num_channels, tr.seed, config.data.crop_min_scale,
                                       config.data.hflip)
        length = -(-len(val) // global_batch_size) * global_batch_size
        self.valid = ImageEvalSamples(val, m.img_size, m.num_channels, length)
        self.classes = train.classes

    has_valid = True

    @property
    def eval_iters(self) -> int:
        """Global batches of one pass over the validation folder (``--eval-iters`` 0: none)."""
        if self.config.training.eval_iters == 0:
            return 0
        return len(self.valid) // self.global_batch_size

    def _loader(self, dataset, consumed: int):
        from megatron_lsh.data.sampler import build_pretraining_data_loader
        return build_pretraining_data_loader(
            dataset, consumed, self.config.training.micro_batch_size, self.groups.dp_rank,
            self.groups.dp_size, num_workers=self.config.data.num_workers)

    def train_iterator(self, consumed_samples: int) -> Iterator:
        """This DP rank's training micro-batches from ``consumed_samples`` on."""
        return iterate_keeping_rng(self._loader(self.train, consumed_samples))

    def valid_iterator(self) -> Optional[Iterator]:
        """The whole validation folder, from its start."""
        return iterate_keeping_rng(self._loader(self.valid, 0))
