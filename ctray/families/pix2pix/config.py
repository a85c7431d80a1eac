"""Configuration of the pix2pix family (seed 001), with its presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ctray.nn.gan import GANMode

GENERATOR_DEPTHS: dict[str, int] = {"unet_256": 8, "unet_512": 9}


@dataclass(frozen=True, kw_only=True)
class Pix2PixConfig:
    """Model, loss and schedule settings; defaults are pix2pix's (Isola et al. 2017).

    The learning rate is constant for the first ``1 - decay_fraction`` of the run's epochs, then
    decays linearly towards 0 (pix2pix: n_epochs=100 + n_epochs_decay=100, i.e. 0.5).

    Attributes:
        generator: ``unet_256`` (8 downsamplings, slices >= 256) or ``unet_512`` (9).
        depth: downsamplings, overriding ``generator`` (small slices: 2**depth must divide them).
        bottleneck: size-independent depth: downsample the slices to this many px (1 = the full
            pix2pix depth, 2 = one level fewer, ...); overrides ``generator``, not ``depth``.
        residual: predict a change added to the input (starts as the identity); off in pix2pix.
    """

    generator: Literal["unet_256", "unet_512"] = "unet_256"
    depth: int | None = None
    bottleneck: int | None = None
    ngf: int = 64
    ndf: int = 64
    disc_layers: int = 3
    norm: Literal["batch", "instance"] = "batch"
    dropout: float = 0.5
    residual: bool = False
    gan_mode: GANMode = "vanilla"
    lambda_l1: float = 100.0
    lr: float = 2e-4
    beta1: float = 0.5
    decay_fraction: float = 0.5

    def num_downs(self, size: int) -> int:
        """Downsamplings of the U-Net for square slices of ``size`` px."""
        if self.depth is not None:
            return self.depth
        if self.bottleneck is not None:
            ratio = size // self.bottleneck
            if ratio * self.bottleneck != size or ratio & (ratio - 1) or ratio < 4:
                raise ValueError(
                    f"bottleneck {self.bottleneck} px needs slices of bottleneck * 2**k px "
                    f"(k >= 2), got {size}"
                )
            return ratio.bit_length() - 1
        return GENERATOR_DEPTHS[self.generator]

    def __post_init__(self) -> None:
        if self.depth is not None and self.depth < 2:
            raise ValueError(f"depth must be >= 2, got {self.depth}")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1 px, got {self.bottleneck}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")


PRESETS: dict[str, dict[str, object]] = {
    # Seconds on a CPU: narrow nets, full depth for whatever (small) slice size.
    "debug": {"ngf": 8, "ndf": 8, "bottleneck": 1, "disc_layers": 2, "norm": "instance"},
    # The CPU demo on 128 px slices (7 downsamplings reach 1x1 as unet_256 does at 256 px).
    "demo": {"ngf": 16, "ndf": 16, "bottleneck": 1, "norm": "instance", "lr": 5e-4},
    # The customer's seed: unet_512, instance norm, lambda_L1 50, lr 1e-4 (resize_to=512).
    "seed": {"generator": "unet_512", "norm": "instance", "lambda_l1": 50.0, "lr": 1e-4},
    # pix2pix's published defaults (unet_256, batch norm, lambda_L1 100, lr 2e-4).
    "pix2pix": {},
}
