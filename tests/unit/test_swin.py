"""Swin-MoE in one process: window partitioning and the shifted-window mask, parameter
counts against the published Swin sizes, the image folder reader's errors, augmentation that
depends only on (seed, sample), and evaluation padding."""
from __future__ import annotations

import os

import pytest
import torch

from megatron_lsh.config import ConfigError, ModelConfig, MoEConfig
from megatron_lsh.data.errors import DataError
from megatron_lsh.data.images import (ImageEvalSamples, ImageFolder, ImageTrainSamples,
                                      random_resized_crop_box)
from megatron_lsh.models import get_recipe
from megatron_lsh.models.swin import (SwinMoEModel, relative_position_index, shift_mask,
                                      window_partition, window_reverse)
from megatron_lsh.parallel.dims import ProcessGroups


def test_window_partition_round_trips_and_cuts_row_major_windows():
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)
    windows = window_partition(x, 2)
    assert windows.shape == (8, 4, 3)
    assert torch.equal(windows[1], x[0, 0:2, 2:4].reshape(4, 3))   # top-right window
    assert torch.equal(window_reverse(windows, 2, 4, 4), x)


def test_shift_mask_separates_regions_and_relative_index_covers_the_table():
    mask = shift_mask(4, 4, 2, 1)
    assert mask.shape == (4, 4, 4)
    assert (mask[0] == 0).all()          # the first window holds one region only
    assert (mask[3] != 0).any()          # the last gathers four regions
    index = relative_position_index(3)
    assert index.shape == (9, 9) and index.min() == 0 and index.max() == 24
    assert (index.diagonal() == 12).all()   # offset (0, 0) is the table's centre


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depths, heads, width, published", [
    ((2, 2, 6, 2), (3, 6, 12, 24), 96, 28.3e6),      # Swin-T
    ((2, 2, 18, 2), (6, 12, 24, 48), 192, 197e6),    # Swin-L
])
def test_dense_swin_matches_the_published_parameter_counts(depths, heads, width, published):
    config = ModelConfig(num_layers=sum(depths), hidden_size=width, num_attention_heads=heads[0],
                         swin_depths=depths, swin_num_heads=heads)
    model = SwinMoEModel(config, MoEConfig(), ProcessGroups.single(), device="meta")
    assert abs(_count(model) - published) / published < 0.005


def test_swin_moe_l_adds_31_experts_to_each_of_its_ten_moe_blocks():
    recipe = get_recipe("swin-moe-l")
    moe = SwinMoEModel(recipe.model(), recipe.moe(), ProcessGroups.single(), device="meta")
    dense = SwinMoEModel(recipe.model(), MoEConfig(), ProcessGroups.single(), device="meta")
    blocks = [b for b in moe.layers.values() if b.is_moe]
    assert [b.number for b in blocks] == [6, 8, 10, 12, 14, 16, 18, 20, 22, 24]
    extra = 0
    for block in blocks:   # 31 more MLPs of width C and 4C, plus a router C x 32
        c = block.norm2.normalized_shape[0]
        extra += 31 * (2 * c * 4 * c + 4 * c + c) + 32 * c
    assert _count(moe) - _count(dense) == extra


def test_a_shape_that_does_not_fit_is_one_sentence():
    bad = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=2, swin_depths=(2, 2),
                      swin_num_heads=(2, 4), img_size=36, patch_dim=4, window_size=4)
    with pytest.raises(ConfigError, match="9 x 9 patch grid of stage 1 is not divisible"):
        SwinMoEModel(bad, MoEConfig(), ProcessGroups.single())
    with pytest.raises(ConfigError, match="must be the sum of --swin-depths"):
        SwinMoEModel(ModelConfig(num_layers=5, hidden_size=32, num_attention_heads=2,
                                 swin_depths=(2, 2), swin_num_heads=(2, 4), img_size=32),
                     MoEConfig(), ProcessGroups.single())


def _folder(root, classes=("a", "b"), per_class=3, size=12):
    from PIL import Image
    for k, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size + i, size), (40 * k + i, 0, 0)).save(
                os.path.join(root, name, f"{i}.png"))
    return root


def test_image_folder_errors_are_one_sentence(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class sub-folders"):
        ImageFolder(str(tmp_path / "empty"))
    train = ImageFolder(_folder(str(tmp_path / "train")))
    val = _folder(str(tmp_path / "val"), classes=("a", "c"))
    with pytest.raises(DataError, match="other classes than the training folder"):
        ImageFolder(val, classes=train.classes)
    (tmp_path / "train" / "z").mkdir()
    with pytest.raises(DataError, match="class folder .*z has no images"):
        ImageFolder(str(tmp_path / "train"))
    (tmp_path / "train" / "z" / "broken.png").write_bytes(b"not a png")
    folder = ImageFolder(str(tmp_path / "train"))
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        folder.load(len(folder) - 1, 3)


def test_training_samples_depend_only_on_seed_and_position(tmp_path):
    folder = ImageFolder(_folder(str(tmp_path / "train"), per_class=4))
    samples = ImageTrainSamples(folder, 24, size=8, channels=3, seed=7)
    again = ImageTrainSamples(folder, 24, size=8, channels=3, seed=7)
    for i in (17, 3, 9):   # any order: no state carried from one read to the next
        a, b = samples[i], again[i]
        assert a["images"].shape == (3, 8, 8)
        assert torch.equal(a["images"], b["images"]) and a["labels"] == b["labels"]
    epoch0 = [samples._image_index(i) for i in range(8)]
    epoch1 = [samples._image_index(i) for i in range(8, 16)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(8)) and epoch0 != epoch1


def test_evaluation_pads_with_samples_that_do_not_count(tmp_path):
    folder = ImageFolder(_folder(str(tmp_path / "val")))
    samples = ImageEvalSamples(folder, size=8, channels=3, length=8)
    masks = [float(samples[i]["loss_mask"]) for i in range(8)]
    assert masks == [1.0] * 6 + [0.0] * 2
    assert samples[0]["images"].shape == (3, 8, 8)


def test_random_resized_crop_stays_inside_and_honours_the_scale():
    import random
    rng = random.Random(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(40, 30, rng, (0.5, 1.0))
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30
        assert w * h >= 0.4 * 1200


def test_mixup_blends_images_and_losses_at_the_drawn_weight():
    config = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=2, swin_depths=(2, 2),
                         swin_num_heads=(2, 4), img_size=16, patch_dim=4, window_size=2,
                         num_classes=5, hidden_dropout=0.0, attention_dropout=0.0,
                         mixup_alpha=0.4)
    model = SwinMoEModel(config, MoEConfig(), ProcessGroups.single(), seed=1)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    loss, _ = model(images, labels)
    torch.manual_seed(5)
    mixed, _, partner, lam = model.mixup(images, labels)
    assert 0.0 < lam < 1.0 and not torch.equal(partner, labels)
    model.eval()   # the same weights without drawing again
    logits, _ = model(mixed)
    expected = (lam * torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                + (1 - lam) * torch.nn.functional.cross_entropy(logits, partner, reduction="none"))
    torch.testing.assert_close(loss, expected)
    eval_loss, _ = model(images, labels)   # no mixup outside training
    torch.testing.assert_close(eval_loss, torch.nn.functional.cross_entropy(
        model(images)[0], labels, reduction="none"))
