"""Sinusoidal codes for ordered discrete conditions (contrast phases, slice offsets...)."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sin/cos code of an integer or real index, vectorised over the batch.

    Ordered conditions (arterial -> venous -> delayed -> native) get codes whose distance grows
    with the index distance, unlike a one-hot code.

    Args:
        dim: code length (even).
        base: the wavelength base (10000 as in Vaswani et al. 2017).
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))
        self.register_buffer("freqs", freqs, persistent=False)
        self.dim = dim

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        angles = index.float().reshape(-1, 1) * self.freqs.reshape(1, -1)
        return torch.stack((angles.sin(), angles.cos()), dim=-1).reshape(-1, self.dim)


class FiLM(nn.Module):
    """Feature-wise affine modulation (Perez et al. 2018) of a feature map by a condition code."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(cond).chunk(2, dim=1)
        view = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        return x * (1 + scale.reshape(view)) + shift.reshape(view)
