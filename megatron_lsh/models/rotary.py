"""Rotary position embeddings (RoPE, Su et al. 2021) as Megatron and GPT-NeoX apply them.

Queries and keys of self-attention are rotated by a position-dependent angle, so their dot
product depends only on the distance between the two positions. The first ``rotary_dim``
channels of each head are split into two halves ``(x1, x2)`` that rotate as the pairs
``(x1_i, x2_i)`` by ``position * base ** (-2i / rotary_dim)`` (the "rotate half" layout, not
the interleaved one); the remaining channels (``--rotary-percent`` < 1) pass unchanged.

Positions are those of the whole sequence: with sequence parallelism the attention's input
projection has already gathered the sequence, so every TP rank rotates the same positions.
"""
from __future__ import annotations

import torch


def rotary_angles(seq_length: int, rotary_dim: int, base: float, *,
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``[seq_length, rotary_dim]`` in fp32, each half repeated."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    positions = torch.arange(seq_length, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rotary(x_bnsd: torch.Tensor, cos_sd: torch.Tensor, sin_sd: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos_sd.shape[-1]`` channels of ``x [b, n, s, d]`` (in its dtype)."""
    rot = cos_sd.shape[-1]
    x_rot, x_pass = x_bnsd[..., :rot], x_bnsd[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos_sd.to(x_bnsd.dtype), sin_sd.to(x_bnsd.dtype)
    out = x_rot * cos + rotated_half * sin
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


class RotaryEmbedding(torch.nn.Module):
    """Caches the angles for the longest sequence seen and rotates queries and keys."""

    def __init__(self, rotary_dim: int, base: float):
        super().__init__()
        self.rotary_dim, self.base = rotary_dim, float(base)
        self._cache: dict = {}

    def angles(self, seq_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` for positions ``0 .. seq_length - 1`` on ``device``."""
        key = (seq_length, str(device))
        if key not in self._cache:
            self._cache = {key: rotary_angles(seq_length, self.rotary_dim, self.base,
                                              device=device)}
        return self._cache[key]

    def forward(self, q_bnsd: torch.Tensor, k_bnsd: torch.Tensor, offset: int = 0):
        """``(q, k)`` rotated by their positions ``offset .. offset + s - 1`` (both
        ``[b, n, s, d]``, same ``s``; ``offset`` > 0 when decoding after cached tokens)."""
        s = q_bnsd.shape[2]
        cos, sin = self.angles(offset + s, q_bnsd.device)
        cos, sin = cos[offset:offset + s], sin[offset:offset + s]
        return apply_rotary(q_bnsd, cos, sin), apply_rotary(k_bnsd, cos, sin)
