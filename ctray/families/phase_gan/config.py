"""Configuration of the phase-GAN family (seed 000), with its presets."""

from __future__ import annotations

from dataclasses import dataclass

from ctray.nn.grl import GRLSchedule


@dataclass(frozen=True, kw_only=True)
class PhaseGANConfig:
    """Model, loss and schedule settings. Defaults follow the customer's seed 000.

    The schedule: ``pretrain_epochs`` of phase-detector pre-training on the frozen encoder,
    then repeating blocks of ``gd_epochs`` generator+discriminator epochs and ``grl_epochs``
    epochs where the detector trains through a gradient-reversal layer (so the encoder learns
    phase-invariant features). λ of the GRL follows ``grl_schedule`` over the adversarial part
    (``grl_ramp_epochs`` long), capped at ``grl_max``.
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
    disc_channels: int = 32
    disc_layers: int = 3
    # Losses: lambda_l1 * L1 + lambda_gan * GAN + lambda_ce * CE (seed: 10, 1, 1).
    lambda_l1: float = 10.0
    lambda_gan: float = 1.0
    lambda_ce: float = 1.0
    # Semi-paired L1: compared after average pooling over l1_pool^3 voxels, so a misalignment of
    # a voxel or two between phases does not reward blurring (1 = voxel-wise, as in the seed).
    l1_pool: int = 4
    # Voxel-wise L1 between output and input ("change only what the phase changes"), which
    # keeps the pooled L1 from leaving high-frequency artefacts unpenalised.
    lambda_identity: float = 1.0
    # Optimisers (Adam).
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    lr_det: float = 1e-4
    beta1: float = 0.5
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
        "pretrain_epochs": 1,
        "gd_epochs": 1,
        "grl_epochs": 1,
        "grl_ramp_epochs": 4,
    },
    # The CPU demo: small enough for a few minutes on 2 cores, still every stage.
    "demo": {
        "vit_patch": 8,
        "vit_hidden": 96,
        "vit_mlp": 192,
        "vit_layers": 2,
        "vit_heads": 4,
        "gen_channels": 12,
        "disc_channels": 12,
        "disc_layers": 2,
        "lr_g": 5e-4,
        "lr_d": 2e-4,
        "lr_det": 5e-4,
        "pretrain_epochs": 1,
        "gd_epochs": 2,
        "grl_epochs": 1,
        "grl_ramp_epochs": 6,
    },
    # The seed's A100 setting (128^3 input in the seed; ViT patch 16).
    "a100": {},
}
