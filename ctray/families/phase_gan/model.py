"""Networks of the phase GAN: ViT encoder, phase-conditioned U-Net generator, phase detector.

The seed decoded a whole volume from one 256-d vector, which cannot carry anatomy. Here the
generator is a 3D U-Net over the input (skip connections at every level) whose bottleneck also
receives the ViT token grid, is modulated by the target-phase code (FiLM) at every decoder
level, and predicts a residual on the input: at initialisation it is the identity, and it only
has to learn the enhancement. Besides the input it sees the input through soft-tissue windows,
where the few-tens-of-HU contrasts between organs are not lost in the wide CT window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import ViT
from torch import nn

from ctray.nn.embedding import FiLM, SinusoidalEmbedding


class ViTEncoder(nn.Module):
    """MONAI ViT over a 3D patch; returns the token grid and a pooled code for the detector."""

    def __init__(
        self,
        *,
        img_size: Sequence[int],
        patch: int,
        hidden: int,
        mlp: int,
        layers: int,
        heads: int,
    ):
        super().__init__()
        for s in img_size:
            if s % patch:
                raise ValueError(
                    f"patch size {tuple(img_size)} is not divisible by ViT patch {patch}"
                )
        self.grid = tuple(s // patch for s in img_size)
        self.vit = ViT(
            in_channels=1,
            img_size=tuple(img_size),
            patch_size=patch,
            hidden_size=hidden,
            mlp_dim=mlp,
            num_layers=layers,
            num_heads=heads,
            classification=False,
            spatial_dims=3,
        )
        self.hidden = hidden
        # MONAI's transformer blocks always create a cross-attention norm, unused without
        # cross-attention; frozen, so DDP does not wait for gradients that never come.
        for name, param in self.vit.named_parameters():
            if "norm_cross_attn" in name:
                param.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, _ = self.vit(x)
        grid = tokens.transpose(1, 2).reshape(x.shape[0], self.hidden, *self.grid)
        return grid, tokens.mean(dim=1)


def _conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.2, inplace=True),
    )


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, cond_dim: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, 2, stride=2)
        self.conv = _conv_block(cout + cskip, cout)
        self.film = FiLM(cond_dim, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.cat((self.up(x), skip), dim=1))
        return self.film(x, cond)


class PhaseGenerator(nn.Module):
    """3D U-Net that blends the input with a target-phase appearance where contrast changes.

    ``y = x + m * d`` with ``d = w . [h, x] + b`` (so ``x + d`` can be an absolute value: the
    weight on ``x`` can learn -1) and a gate ``m = sigmoid(g . h + b_g)`` that starts nearly
    closed: where the phase changes nothing the output stays the input to the last HU, where it
    changes the network can write the target organ's value whatever the source's. ``d`` starts
    at zero, so the generator is the identity at initialisation.

    Conditioning: FiLM by the target-phase code at the bottleneck and every decoder level.

    Args:
        levels: number of stride-2 downsamplings; equals log2(ViT patch) so the bottleneck
            and the token grid share a resolution.
        channels: width of the first level (doubled per level, capped at 8x).
        token_dim: ViT hidden size.
        cond_dim: phase code length.
        windows: extra input channels ``clamp((x - lo) / (hi - lo), 0, 1)`` for each
            ``(lo, hi)``, in the input's normalised units (soft-tissue windows).
        gate_bias: initial gate logit (sigmoid(-3) ~ 0.05).
    """

    def __init__(
        self,
        *,
        levels: int,
        channels: int,
        token_dim: int,
        cond_dim: int,
        windows: Sequence[tuple[float, float]] = (),
        gate_bias: float = -3.0,
    ):
        super().__init__()
        widths = [channels * min(2**i, 8) for i in range(levels + 1)]
        self.register_buffer(
            "windows", torch.tensor(list(windows), dtype=torch.float32).reshape(-1, 2), False
        )
        self.stem = _conv_block(1 + len(windows), widths[0])
        self.down = nn.ModuleList(_conv_block(widths[i], widths[i + 1], 2) for i in range(levels))
        self.tokens = nn.Conv3d(token_dim, widths[-1], 1)
        self.bottleneck = _conv_block(2 * widths[-1], widths[-1])
        self.bottleneck_film = FiLM(cond_dim, widths[-1])
        self.up = nn.ModuleList(
            _UpBlock(widths[i + 1], widths[i], widths[i], cond_dim) for i in reversed(range(levels))
        )
        self.delta = nn.Conv3d(widths[0] + 1, 1, 1)
        nn.init.zeros_(self.delta.weight)
        nn.init.zeros_(self.delta.bias)
        self.gate = nn.Conv3d(widths[0], 1, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_bias)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.windows):
            return x
        lo = self.windows[:, 0].reshape(1, -1, *([1] * (x.ndim - 2)))
        hi = self.windows[:, 1].reshape(1, -1, *([1] * (x.ndim - 2)))
        return torch.cat((x, ((x - lo) / (hi - lo)).clamp(0, 1)), dim=1)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(self._inputs(x))]
        for down in self.down:
            skips.append(down(skips[-1]))
        h = self.bottleneck(torch.cat((skips.pop(), self.tokens(tokens)), dim=1))
        h = self.bottleneck_film(h, cond)
        for up in self.up:
            h = up(h, skips.pop(), cond)
        gate = torch.sigmoid(self.gate(h))
        return x + gate * self.delta(torch.cat((h, x), dim=1))


class PhaseDetector(nn.Module):
    """MLP on encoder features -> phase logits (no softmax: cross-entropy takes logits).

    Works on any leading shape: a pooled code (B, C) or every token (B, N, C).
    """

    def __init__(self, in_dim: int, num_phases: int = 4, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_phases)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class PhaseCode(nn.Module):
    """Sinusoidal phase code followed by a small MLP, so the code's scale is learnt."""

    def __init__(self, dim: int):
        super().__init__()
        self.sin = SinusoidalEmbedding(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, phase: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sin(phase))


def unet_levels(vit_patch: int) -> int:
    """Downsamplings that bring the U-Net to the ViT token grid resolution."""
    levels = round(math.log2(vit_patch))
    if 2**levels != vit_patch:
        raise ValueError(f"vit_patch must be a power of two, got {vit_patch}")
    return levels
