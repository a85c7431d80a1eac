"""The pix2pix U-Net generator and its conditional 70x70 PatchGAN discriminator.

The U-Net follows Isola et al.'s reference code: ``depth`` stride-2 4x4 convolutions down to a
1x1 bottleneck, skip connections at every level, no norm on the outermost and innermost
downsampling, dropout 0.5 in the decoder levels next to the bottleneck (three of them in
unet_256), Tanh output. Inputs and outputs stay in the recorded HU window's [0, 1].
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn

Norm = Literal["batch", "instance"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class _Level(nn.Module):
    """One U-Net level: down, inner levels, up; concatenates its input (skip) unless outermost."""

    def __init__(
        self,
        outer: int,
        inner: int,
        sub: nn.Module | None,
        *,
        in_channels: int | None = None,
        norm: Norm,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.outermost = in_channels is not None
        bias = norm == "instance"  # batch norm has its own shift
        down = nn.Conv2d(in_channels or outer, inner, 4, stride=2, padding=1, bias=bias)
        if self.outermost:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1)
            layers: list[nn.Module] = [down, sub, nn.ReLU(True), up]
        elif sub is None:  # innermost: no norm on the 1x1 bottleneck
            up = nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1, bias=bias)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, _norm(norm, outer)]
        else:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1, bias=bias)
            layers = [nn.LeakyReLU(0.2, True), down, _norm(norm, inner), sub]
            layers += [nn.ReLU(True), up, _norm(norm, outer)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y if self.outermost else torch.cat((x, y), dim=1)


class UNetGenerator(nn.Module):
    """pix2pix U-Net on (B, 1, H, W) slices in [0, 1]; H and W must be multiples of 2**depth."""

    def __init__(
        self,
        *,
        depth: int,
        ngf: int = 64,
        norm: Norm = "batch",
        dropout: float = 0.5,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.depth, self.residual = depth, residual
        width = [ngf * min(2**i, 8) for i in range(depth)]
        block: nn.Module | None = None
        for i in range(depth - 1, 0, -1):
            drop = dropout if 4 <= i < depth - 1 else 0.0  # pix2pix: the ngf*8 middle levels
            block = _Level(width[i - 1], width[i], block, norm=norm, dropout=drop)
        self.net = _Level(1, width[0], block, in_channels=1, norm=norm)
        self.tanh = nn.Tanh()
        init_weights(self)
        if residual:  # start as the identity: the output layer adds nothing
            out_layer = self.net.model[-1]
            nn.init.zeros_(out_layer.weight)
            nn.init.zeros_(out_layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2**self.depth
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"slices {tuple(x.shape[-2:])} are not multiples of 2**depth = {factor}; "
                "resize them or lower the generator depth"
            )
        y = self.tanh(self.net(2.0 * x - 1.0))
        return x + y if self.residual else (y + 1.0) / 2.0


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """pix2pix's ``normal`` init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)


def patch_discriminator(*, ndf: int = 64, layers: int = 3, norm: Norm = "batch") -> nn.Module:
    """The conditional PatchGAN: sees (input, output) as 2 channels; 3 layers = 70x70 patches."""
    disc = PatchDiscriminator(
        spatial_dims=2,
        channels=ndf,
        in_channels=2,
        out_channels=1,
        num_layers_d=layers,
        norm=norm.upper(),
    )
    init_weights(disc)
    return disc
