"""Finite scalar quantisation (Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple",
ICLR 2024, arXiv:2309.15505).

Each of ``len(levels)`` latent channels is bounded to ``levels[i]`` integer values and rounded;
the codebook is implicit (the product grid), so there is nothing to learn, no commitment loss
and no codebook collapse. MONAI ships no FSQ; the method is a few lines.

Quantisation runs in float32 with autocast off: in bf16 the bound and the rounding lose the
integer grid and indices leave the codebook (vector-quantize-pytorch issue #107).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FSQ", "parse_levels", "round_ste"]


def parse_levels(text: str | Sequence[int]) -> tuple[int, ...]:
    """Levels from ``"8,5,5,5"`` (how configs store them: Optuna cannot store a list) or ints.

    Raises:
        ValueError: for anything but at least one integer >= 2 per channel.
    """
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            levels = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"FSQ levels must be integers like '8,5,5,5', got {text!r}") from None
    else:
        levels = tuple(int(v) for v in text)
    if not levels or min(levels) < 2:
        raise ValueError(f"FSQ needs at least one channel with >= 2 levels each, got {text!r}")
    return levels


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass; identity gradient (straight-through estimator)."""
    return x + (x.round() - x).detach()


class FSQ(nn.Module):
    """Finite scalar quantiser over channel 1 of a (B, C, *spatial) tensor, C = len(levels).

    Channel i is bounded to the open interval around ``levels[i]`` integers with a shifted
    tanh (even counts are offset by one half, so that rounding gives exactly ``levels[i]``
    values, not one more), rounded with a straight-through gradient and rescaled to [-1, 1].
    A code's index is the mixed-radix number of its per-channel integers.

    Args:
        levels: integer levels per channel (the paper's rule: each >= 5; Table 1:
            [8,6,5] for 2^8 codes, [8,5,5,5] for 2^10, [7,5,5,5,5] for 2^12, [8,8,8,6,5] for
            2^14, [8,8,8,5,5,5] for 2^16).
        eps: keeps the bound strictly inside the outermost rounding boundary.
    """

    def __init__(self, levels: Sequence[int], eps: float = 1e-3):
        super().__init__()
        self.levels = parse_levels(levels)
        lv = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor((1, *self.levels[:-1]), dtype=torch.int64), dim=0)
        # The bound: tanh(z + shift) * half_range - offset lies in (-L/2, L/2) (odd L) or
        # (-L/2, L/2 - 1) (even L), whose integers are exactly L values.
        half_range = (lv - 1) * (1 - eps) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        self.register_buffer("half_range", half_range, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        # The shift puts z = 0 on the integer 0 instead of a rounding boundary (even L); with
        # L = 2 that integer is the range's edge, so the shift is capped there.
        shift = torch.atanh((offset / half_range).clamp(max=0.5))
        self.register_buffer("shift", shift, persistent=False)
        # Rounded integers run from -(L // 2) to (L - 1) // 2; dividing by L // 2 maps them
        # into [-1, 1].
        self.register_buffer("half_width", torch.floor(lv / 2), persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        """Latent channels the quantiser expects."""
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return t.reshape(1, -1, *([1] * (ndim - 2)))

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous latents -> values whose rounding takes exactly ``levels`` integers."""
        v = lambda t: self._view(t, z.ndim)  # noqa: E731
        return torch.tanh(z + v(self.shift)) * v(self.half_range) - v(self.offset)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, *spatial) latents -> (codes in [-1, 1] with straight-through gradients,
        indices (B, *spatial) int64 in [0, codebook_size))."""
        if z.ndim < 2 or z.shape[1] != self.dim:
            raise ValueError(f"FSQ{self.levels} expects (B, {self.dim}, ...), got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            integers = round_ste(self.bound(z.float()))
            codes = integers / self._view(self.half_width, z.ndim)
        return codes, self.codes_to_indices(codes)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, C, *spatial) on the grid -> indices (B, *spatial)."""
        v = lambda t: self._view(t, codes.ndim)  # noqa: E731
        digits = (codes.detach().float() * v(self.half_width) + v(self.half_width)).round()
        return (digits.long() * v(self.basis)).sum(dim=1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, *spatial) -> codes (B, C, *spatial) in [-1, 1], float32."""
        idx = indices.long().unsqueeze(1)
        ndim = idx.ndim
        levels = torch.tensor(self.levels, device=idx.device)
        digits = (idx // self._view(self.basis, ndim)) % self._view(levels, ndim)
        half = self._view(self.half_width, ndim)
        return (digits.float() - half) / half
