"""Swin-MoE: a Swin Transformer image classifier whose MLPs are MoE in chosen blocks.

As Swin (Liu et al., 2021) and Swin-MoE (the Swin-Transformer repository with Tutel): the
image is cut into ``patch_dim`` x ``patch_dim`` patches embedded as tokens; each stage runs
blocks of window attention (``window_size`` x ``window_size`` patches per window, a learned
relative position bias per head) where every second block shifts the windows by half a window
(with the mask that keeps shifted-in patches apart); between stages a patch merging joins
2 x 2 neighbours (width x 2, tokens / 4). The head is a LayerNorm, the mean over tokens and a
linear layer. Blocks are pre-norm: ``x + attn(norm(x))``, ``x + mlp(norm(x))``.

The MLP of a block is dense or a :class:`~megatron_lsh.moe.MoELayer` (experts split over the
expert-parallel ranks, every all-to-all compressor), decided by ``--moe-layer-freq`` over the
blocks numbered 1..sum(depths) across stages; the recipes put MoE in every other block of
the last two stages, as Swin-MoE does. ``--label-smoothing`` and ``--mixup-alpha`` shape the training loss.
Layout support: data and expert parallelism (EP, DP,
EP x DP); tensor and pipeline parallelism are not implemented for this model and are refused.

Tensors are batch-first here (``[b, L, C]`` tokens, ``[b, H, W, C]`` maps): the windows are
a batch dimension of their own. Legend: b batch, H W patch grid, C width, L = H W tokens,
w window side, n heads, d head width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lsh.config import ConfigError, ModelConfig, MoEConfig
from megatron_lsh.models.base import StageModel
from megatron_lsh.models.classification import classification_loss
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.layers import init_method_normal
from megatron_lsh.parallel.random import SeedPart, layer_seed, seeded


def check_swin_config(config: ModelConfig) -> None:
    """ConfigError (one sentence) for a Swin shape that does not fit together."""
    depths, heads = config.swin_depths, config.swin_num_heads
    if len(depths) != len(heads):
        raise ConfigError(f"--swin-depths {depths} and --swin-num-heads {heads} give different "
                          f"numbers of stages")
    if sum(depths) != config.num_layers:
        raise ConfigError(f"--num-layers ({config.num_layers}) must be the sum of --swin-depths "
                          f"{depths} ({sum(depths)})")
    if config.img_size % config.patch_dim:
        raise ConfigError(f"--img-size ({config.img_size}) is not divisible by --patch-dim "
                          f"({config.patch_dim})")
    grid = config.img_size // config.patch_dim
    for stage, n in enumerate(heads):
        width = config.hidden_size * 2 ** stage
        if width % n:
            raise ConfigError(f"stage {stage + 1} is {width} wide, not divisible by its "
                              f"{n} heads (--swin-num-heads)")
        side = grid // 2 ** stage
        if stage and (grid // 2 ** (stage - 1)) % 2:
            raise ConfigError(f"the {grid // 2 ** (stage - 1)} x {grid // 2 ** (stage - 1)} "
                              f"patch grid of stage {stage} cannot be merged 2 x 2 "
                              f"(--img-size / --patch-dim must be divisible by "
                              f"{2 ** (len(heads) - 1)})")
        window = min(config.window_size, side)
        if side % window:
            raise ConfigError(f"the {side} x {side} patch grid of stage {stage + 1} is not "
                              f"divisible by --window-size {config.window_size}")


def window_partition(x_bhwc: torch.Tensor, w: int) -> torch.Tensor:
    """``[b, H, W, C]`` -> ``[b * (H/w) * (W/w), w * w, C]`` (windows in row-major order)."""
    b, h, wd, c = x_bhwc.shape
    x = x_bhwc.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def window_reverse(windows: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    """The inverse of :func:`window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, wd, c)


def relative_position_index(w: int) -> torch.Tensor:
    """``[w*w, w*w]`` index into the ``(2w-1)^2`` relative-position table."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def shift_mask(h: int, wd: int, w: int, shift: int) -> torch.Tensor:
    """``[nW, w*w, w*w]`` additive mask (0 or -inf-like) of shifted windows: patches that the
    cyclic shift brought together from different image regions do not attend to each other."""
    region = torch.zeros(1, h, wd, 1)
    cuts = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            region[:, hs, ws, :] = label
            label += 1
    ids = window_partition(region, w).squeeze(-1)
    return (ids[:, None, :] != ids[:, :, None]).float() * -100.0


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a relative position bias."""

    def __init__(self, width: int, heads: int, w: int, config: ModelConfig, device=None):
        super().__init__()
        self.heads, self.w = heads, w
        self.dropout = config.attention_dropout
        init = init_method_normal(config.init_method_std)
        self.qkv = nn.Linear(width, 3 * width, device=device)
        self.proj = nn.Linear(width, width, device=device)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * w - 1) ** 2, heads, device=device))
        if self.qkv.weight.device.type != "meta":
            for linear in (self.qkv, self.proj):
                init(linear.weight)
                nn.init.zeros_(linear.bias)
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(w),
                             persistent=False)

    def forward(self, x_bnc: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``[b * nW, w*w, C]`` windows; ``mask`` ``[nW, w*w, w*w]`` or None."""
        bw, n, c = x_bnc.shape
        q, k, v = self.qkv(x_bnc).view(bw, n, 3, self.heads, c // self.heads) \
            .permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.heads).permute(2, 0, 1).unsqueeze(0)   # [1, n, L, L]
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.to(bias.dtype)[None, :, None]).expand(
                bw // nw, nw, self.heads, n, n).reshape(bw, self.heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinMLP(nn.Module):
    """The dense MLP of a block: Linear(C, 4C), GELU, Linear(4C, C)."""

    def __init__(self, width: int, hidden: int, config: ModelConfig, device=None):
        super().__init__()
        init = init_method_normal(config.init_method_std)
        self.fc1 = nn.Linear(width, hidden, device=device)
        self.fc2 = nn.Linear(hidden, width, device=device)
        if self.fc1.weight.device.type != "meta":
            for linear in (self.fc1, self.fc2):
                init(linear.weight)
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Window attention (shifted in odd blocks of a stage) and a dense or MoE MLP.

    Like a :class:`~megatron_lsh.models.transformer.TransformerLayer` it has a global
    ``layer_number``, ``is_moe``, ``mlp`` and (MoE) ``last_aux_loss``, which is what the
    trainer reads for the per-layer MoE statistics (``is_block``)."""

    is_block = True

    def __init__(self, config: ModelConfig, moe: MoEConfig, groups: ProcessGroups, *,
                 number: int, width: int, heads: int, side: int, shifted: bool, is_moe: bool,
                 seed: int, device=None):
        super().__init__()
        self.number, self.side, self.is_moe = number, side, is_moe
        self.layer_number = number
        self.w = min(config.window_size, side)
        self.shift = self.w // 2 if shifted and side > config.window_size else 0
        self.dropout = config.hidden_dropout
        with seeded(layer_seed(seed, number, SeedPart.LAYER)):
            self.norm1 = nn.LayerNorm(width, eps=config.layernorm_epsilon, device=device)
            self.attn = WindowAttention(width, heads, self.w, config, device=device)
            self.norm2 = nn.LayerNorm(width, eps=config.layernorm_epsilon, device=device)
            if is_moe:
                from megatron_lsh.moe import MoELayer
                self.mlp = MoELayer(moe, width, moe.moe_ffn_hidden_size or 4 * width, groups,
                                    activation="gelu", add_bias=True,
                                    init_method_std=config.init_method_std,
                                    output_layer_init_std=config.init_method_std,
                                    seed=layer_seed(seed, number, SeedPart.MOE),
                                    compress=moe.compresses_layer(number), device=device)
            else:
                self.mlp = SwinMLP(width, 4 * width, config, device=device)
        mask = shift_mask(side, side, self.w, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(self, x_blc: torch.Tensor):
        b, n, c = x_blc.shape
        h = self.norm1(x_blc).view(b, self.side, self.side, c)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), dims=(1, 2))
        h = window_reverse(self.attn(window_partition(h, self.w), self.attn_mask), self.w,
                           self.side, self.side)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), dims=(1, 2))
        x = x_blc + self._drop(h.reshape(b, n, c))
        h = self.norm2(x)
        if self.is_moe:
            y, losses = self.mlp(h)
            aux = losses["aux_loss"] + losses["z_loss"]
            self.last_aux_loss = losses["aux_loss"].detach()
        else:
            y, aux = self.mlp(h), x.new_zeros(())
        return x + self._drop(y), aux


class PatchMerging(nn.Module):
    """2 x 2 neighbouring patches -> one: LayerNorm(4C), Linear(4C, 2C) without bias."""

    def __init__(self, width: int, side: int, config: ModelConfig, device=None):
        super().__init__()
        self.side = side
        self.norm = nn.LayerNorm(4 * width, eps=config.layernorm_epsilon, device=device)
        self.reduction = nn.Linear(4 * width, 2 * width, bias=False, device=device)
        if self.reduction.weight.device.type != "meta":
            init_method_normal(config.init_method_std)(self.reduction.weight)

    def forward(self, x_blc: torch.Tensor) -> torch.Tensor:
        b, _, c = x_blc.shape
        x = x_blc.view(b, self.side, self.side, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinMoEModel(StageModel):
    """Swin-MoE image classifier (one stage: no pipeline split).

    ``forward(images [b, C_in, H, W], labels [b] | None)`` returns ``(out, aux_loss)``: the
    per-sample cross-entropy [b] (with ``--label-smoothing``) with labels, the fp32 logits
    [b, num_classes] without.
    """

    kind = "swin"

    @classmethod
    def tokens_per_sample(cls, config: ModelConfig) -> int:
        """Patches of one image (the first stage's tokens)."""
        return (config.img_size // config.patch_dim) ** 2

    @staticmethod
    def synthetic_batch(config: ModelConfig, batch: int, generator: torch.Generator) -> dict:
        """Random normalised images and labels; every sample counts."""
        images = torch.randn(batch, config.num_channels, config.img_size, config.img_size,
                             generator=generator)
        return dict(images=images,
                    labels=torch.randint(0, config.num_classes, (batch,), generator=generator),
                    loss_mask=torch.ones(batch))

    def __init__(self, config: ModelConfig, moe: MoEConfig, groups: ProcessGroups, *,
                 seed: int = 1234, sequence_parallel: bool = False, device=None):
        super().__init__()
        if groups.tp_size > 1 or groups.pp_size > 1 or sequence_parallel:
            raise ConfigError("Swin-MoE runs with data and expert parallelism only: "
                              "--tensor-model-parallel-size, --pipeline-model-parallel-size "
                              "and --sequence-parallel are not implemented for it")
        check_swin_config(config)
        self.config = config
        self.pre_process = self.post_process = True
        c, p = config.hidden_size, config.patch_dim
        grid = config.img_size // p
        with seeded(seed + SeedPart.EMBEDDING):
            self.patch_embed = nn.Conv2d(config.num_channels, c, kernel_size=p, stride=p,
                                         device=device)
            self.patch_norm = nn.LayerNorm(c, eps=config.layernorm_epsilon, device=device)
        total = config.num_layers
        blocks, merges, number = [], [], 0
        for stage, (depth, heads) in enumerate(zip(config.swin_depths, config.swin_num_heads)):
            width, side = c * 2 ** stage, grid // 2 ** stage
            for i in range(depth):
                number += 1
                blocks.append(SwinBlock(config, moe, groups, number=number, width=width,
                                        heads=heads, side=side, shifted=i % 2 == 1,
                                        is_moe=moe.num_experts > 0
                                        and moe.is_moe_layer(number, total),
                                        seed=seed, device=device))
            if stage + 1 < len(config.swin_depths):
                with seeded(layer_seed(seed, number, SeedPart.PATCH_MERGING)):
                    merges.append(PatchMerging(width, side, config, device=device))
        # Keyed by the global block number, as the language models' layers.
        self.layers = nn.ModuleDict({str(b.number): b for b in blocks})
        self.merges = nn.ModuleList(merges)
        self._stage_ends = list(torch.tensor(config.swin_depths).cumsum(0).tolist())
        last = c * 2 ** (len(config.swin_depths) - 1)
        with seeded(layer_seed(seed, 0, SeedPart.CLASSIFICATION_HEAD)):
            self.norm = nn.LayerNorm(last, eps=config.layernorm_epsilon, device=device)
            self.head = nn.Linear(last, config.num_classes, device=device)
            if self.head.weight.device.type != "meta":
                init_method_normal(config.init_method_std)(self.head.weight)
                nn.init.zeros_(self.head.bias)

    def mixup(self, images: torch.Tensor, labels: torch.Tensor):
        """``(mixed images, labels, permuted labels, weight)``: each image blended with the
        one a random permutation pairs it with, at a Beta(alpha, alpha) weight (mixup, Zhang
        et al. 2018); drawn from the global generator, so a resumed run repeats them."""
        alpha = self.config.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        perm = torch.randperm(images.shape[0], device=images.device)
        return lam * images + (1.0 - lam) * images[perm], labels, labels[perm], lam

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None):
        mixed = None
        if labels is not None and self.training and self.config.mixup_alpha > 0:
            images, labels, partner, lam = self.mixup(images, labels)
            mixed = (partner, lam)
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))
        x = self.patch_norm(x.flatten(2).transpose(1, 2))   # [b, L, C]
        aux = x.new_zeros(())
        merges = iter(self.merges)
        for block in self.layers.values():
            x, block_aux = block(x)
            aux = aux + block_aux
            if block.number in self._stage_ends and block.number != self.config.num_layers:
                x = next(merges)(x)
        logits = self.head(self.norm(x).mean(dim=1)).float()
        if labels is None:
            return logits, aux
        loss = self._loss(logits, labels)
        if mixed is not None:
            partner, lam = mixed
            loss = lam * loss + (1.0 - lam) * self._loss(logits, partner)
        return loss, aux

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample cross-entropy, with ``--label-smoothing``."""
        if self.config.label_smoothing:
            return F.cross_entropy(logits, labels.long(), reduction="none",
                                   label_smoothing=self.config.label_smoothing)
        return classification_loss(logits, labels, regression=False)
