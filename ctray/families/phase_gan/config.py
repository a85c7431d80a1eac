"""Configuration of the phase-GAN family (seed 000), with its presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ctray.nn.grl import GRLSchedule

RecLoss = Literal["mse", "l1", "huber"]
LRSchedule = Literal["constant", "cosine"]


@dataclass(frozen=True, kw_only=True)
class PhaseGANConfig:
    """Model, loss and schedule settings. Defaults follow the customer's seed 000 where it works.

    The schedule: ``pretrain_epochs`` of phase-detector pre-training on the frozen encoder,
    then repeating blocks of ``gd_epochs`` generator+discriminator epochs and ``grl_epochs``
    detector-only epochs. The gradient reversal acts inside the generator step (DANN): the
    detector classifies the source phase from every ViT token through a gradient-reversal layer,
    so the encoder's whole token grid (what the generator reads) is pushed towards phase
    invariance, weighed against the image losses by ``lambda_ce * λ``. λ follows
    ``grl_schedule`` over ``grl_ramp_epochs`` after pre-training, capped at ``grl_max``.

    Generator loss: ``lambda_rec * rec + lambda_gan * GAN + lambda_ce * λ * CE_reversed +
    lambda_identity * |G(x) - x| + lambda_organ * organ_means``, with ``rec`` the ``rec_loss``
    between the output and the target phase registered onto the source (see the data builder)
    and ``organ_means`` the error of each organ's mean, both on HU / 100.
    """

    # ViT encoder (MONAI ViT); seed: hidden 384, mlp 1536, 12 layers, 12 heads, patch 16.
    vit_patch: int = 16
    vit_hidden: int = 384
    vit_mlp: int = 1536
    vit_layers: int = 12
    vit_heads: int = 12
    pretrained: str | None = None
    # Generator and discriminator widths.
    phase_dim: int = 32
    gen_channels: int = 32
    # The generator also sees the input through two soft-tissue windows (W400/L40 and
    # W400/L300): in the [-1000, 1000] HU window the organ contrasts that tell liver from
    # muscle or an enhanced vessel from bone are a few hundredths of the input range.
    gen_windows: bool = True
    disc_channels: int = 32
    disc_layers: int = 3
    # Losses (seed: L1 x 10 + GAN x 1 + CE x 1).
    lambda_rec: float = 10.0
    rec_loss: RecLoss = "mse"
    # The reconstruction is compared after average pooling over rec_pool^3 voxels (1: voxel-wise;
    # the target is registered onto the source, so voxel-wise is the default).
    rec_pool: int = 1
    # Extra weight of voxels whose target differs from the input (steps.change_weights): up
    # to 1 + rec_change_weight where the local change reaches 100 HU (0: uniform weights).
    rec_change_weight: float = 0.0
    lambda_gan: float = 1.0
    # Squared error of each organ's mean HU (steps.organ_mean_loss), on HU / 100.
    lambda_organ: float = 1.0
    lambda_ce: float = 1.0
    # Voxel-wise L1 between output and input ("change only what the phase changes"); it pulls
    # every voxel towards no change, so it is off by default (see docs).
    lambda_identity: float = 0.0
    # Optimisers (Adam). lr_schedule "cosine" decays every learning rate per epoch over the
    # epochs after pre-training (to 0 at the last); the last weights are the ones exported.
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    lr_det: float = 1e-4
    beta1: float = 0.5
    lr_schedule: LRSchedule = "cosine"
    # Schedule (seed: 10 pre-train epochs, then alternate 5 + 5, λ 0 -> 1 over 50 epochs).
    pretrain_epochs: int = 10
    gd_epochs: int = 5
    grl_epochs: int = 5
    grl_schedule: GRLSchedule = "linear"
    grl_max: float = 1.0
    grl_gamma: float = 10.0
    grl_ramp_epochs: int = 50


PRESETS: dict[str, dict[str, object]] = {
    # Seconds on a CPU: a 2-layer ViT and narrow convolutions, schedule compressed to 1+1+1.
    "debug": {
        "vit_patch": 8,
        "vit_hidden": 48,
        "vit_mlp": 96,
        "vit_layers": 2,
        "vit_heads": 4,
        "phase_dim": 16,
        "gen_channels": 8,
        "disc_channels": 8,
        "disc_layers": 2,
        "lr_g": 1e-3,
        "lr_d": 1e-3,
        "lr_det": 1e-3,
        "beta1": 0.9,
        "pretrain_epochs": 1,
        "gd_epochs": 1,
        "grl_epochs": 1,
        "grl_ramp_epochs": 4,
    },
    # The CPU demo: a few minutes per trial on one core. Pre-training is one cheap epoch (the
    # detector alone), then 3 generator epochs per detector epoch; the learning rates decay
    # (cosine) to the last epoch, whose weights are exported.
    "demo": {
        "vit_patch": 8,
        "vit_hidden": 96,
        "vit_mlp": 192,
        "vit_layers": 2,
        "vit_heads": 4,
        "gen_channels": 12,
        "disc_channels": 12,
        "disc_layers": 2,
        "lr_g": 1e-3,
        "lr_d": 2e-4,
        "lr_det": 5e-4,
        "beta1": 0.9,
        "pretrain_epochs": 1,
        "gd_epochs": 3,
        "grl_epochs": 1,
        "grl_ramp_epochs": 6,
    },
    # The seed's A100 setting (128^3 input in the seed; ViT patch 16).
    "a100": {},
}
