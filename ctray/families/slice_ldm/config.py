"""Configuration of the slice_ldm family (seed 002), with its presets.

Stage 1 (``autoencoder``) fields start with ``ae_`` / ``disc_`` or name a stage-1 loss; stage 2
(``diffusion``) fields configure the latent denoiser, its noise schedule and sampling. A stage-2
run inherits every stage-1 field from the export it starts from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ctray.optim import cosine_factor

Schedule = Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"]
Prediction = Literal["epsilon", "v_prediction", "sample"]
Output = Literal["decode", "cubic_delta"]


@dataclass(frozen=True, kw_only=True)
class SliceLDMConfig:
    """Model, loss, schedule and sampling settings.

    Defaults follow MONAI's 3D latent-diffusion tutorial where it has one (KL weight 1e-7,
    adversarial weight 0.01 after a 5-epoch warm-up, 1000 DDPM steps, scaled-linear betas
    0.0015 -> 0.0195) and the seed otherwise (20 DDIM steps).

    Attributes:
        ae_channels: AutoencoderKL widths per level; ``len - 1`` halvings of every axis.
        ae_res_blocks: residual blocks per level.
        ae_attention: self-attention at the deepest level and in the mid blocks (costly in 3D).
        latent_channels: channels of the latent.
        norm_groups: GroupNorm groups of both networks (must divide every width).
        kl_weight: weight of the KL term (the latent stays close to a unit Gaussian).
        adv_weight: weight of the LSGAN term from a 3D PatchDiscriminator (0: off).
        adv_warmup_epochs / adv_warmup_steps: the adversarial term (and the discriminator's
            training) starts only after both.
        disc_channels / disc_layers: PatchDiscriminator width and strided layers.
        lr_ae / lr_d: Adam learning rates of the autoencoder and the discriminator.
        lr_schedule: ``cosine`` decays every learning rate per epoch to ``lr_floor`` times its
            base over the run's epochs (set from the epoch, so resumes need no state);
            ``constant`` keeps it.
        unet_channels: DiffusionModelUNet widths; ``len - 1`` halvings of the latent.
        unet_res_blocks: residual blocks per level.
        unet_attention: self-attention at the deepest level.
        num_head_channels: channels per attention head.
        train_timesteps: DDPM steps of the forward process.
        schedule / beta_start / beta_end: the noise schedule (betas ignored by ``cosine``).
        prediction_type: what the denoiser predicts: ``epsilon``, ``v_prediction`` or
            ``sample`` (x0).
        residual: diffuse the thin latent's residual over the cubic latent instead of the thin
            latent itself (the condition already holds most of the image).
        output: ``decode`` = decode the sampled latent; ``cubic_delta`` = cubic plus the
            decoded change, D(z) - D(z_cubic), so the autoencoder's reconstruction error
            cancels where the model changes nothing.
        lr_diffusion: Adam learning rate of the denoiser.
        sample_steps: DDIM steps at prediction (the seed: 20).
        val_sample_steps: DDIM steps in validation (sampling is the costly part of it).
        soft_window: the second HU window metrics are reported in (lo, hi; 40/400 soft tissue).
        seed: seeds the initial noise of sampling, so predictions are repeatable.
    """

    # Stage 1: autoencoder.
    ae_channels: tuple[int, ...] = (32, 64, 64)
    ae_res_blocks: int = 1
    ae_attention: bool = False
    latent_channels: int = 4
    norm_groups: int = 16
    kl_weight: float = 1e-7
    adv_weight: float = 0.01
    adv_warmup_epochs: int = 5
    adv_warmup_steps: int = 0
    disc_channels: int = 32
    disc_layers: int = 3
    lr_ae: float = 1e-4
    lr_d: float = 5e-4
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    lr_floor: float = 0.1
    # Stage 2: latent diffusion.
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_res_blocks: int = 2
    unet_attention: bool = True
    num_head_channels: int = 16
    train_timesteps: int = 1000
    schedule: Schedule = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: Prediction = "v_prediction"
    residual: bool = True
    output: Output = "cubic_delta"
    lr_diffusion: float = 1e-4
    sample_steps: int = 20
    val_sample_steps: int = 10
    soft_window: tuple[float, float] = (-160.0, 240.0)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ae_channels", "unet_channels"):
            widths = getattr(self, name)
            if not widths:
                raise ValueError(f"{name} needs at least one level")
            bad = [w for w in widths if w % self.norm_groups]
            if bad:
                raise ValueError(
                    f"{name} {widths}: widths {bad} are not multiples of norm_groups="
                    f"{self.norm_groups}; pick widths divisible by it or lower norm_groups"
                )
        if self.unet_attention and self.unet_channels[-1] % self.num_head_channels:
            raise ValueError(
                f"unet_channels[-1]={self.unet_channels[-1]} is not a multiple of "
                f"num_head_channels={self.num_head_channels}"
            )
        if not 1 <= self.val_sample_steps <= self.train_timesteps:
            raise ValueError(f"val_sample_steps must be in [1, {self.train_timesteps}]")
        if not 1 <= self.sample_steps <= self.train_timesteps:
            raise ValueError(f"sample_steps must be in [1, {self.train_timesteps}]")
        if self.soft_window[1] <= self.soft_window[0]:
            raise ValueError(f"soft_window needs lo < hi, got {self.soft_window}")
        if not 0.0 <= self.lr_floor <= 1.0:
            raise ValueError(f"lr_floor must be in [0, 1], got {self.lr_floor}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")

    def lr_factor(self, epoch: int, num_epochs: int) -> float:
        """Multiplier of every base learning rate in ``epoch`` (0-based) of ``num_epochs``."""
        if self.lr_schedule == "constant":
            return 1.0
        return cosine_factor(epoch, num_epochs, self.lr_floor)

    @property
    def ae_downsample(self) -> int:
        """How many times smaller the latent is than the thin patch, per axis."""
        return 2 ** (len(self.ae_channels) - 1)

    @property
    def unet_downsample(self) -> int:
        """How many times the denoiser halves the latent, as one factor per axis."""
        return 2 ** (len(self.unet_channels) - 1)


PRESETS: dict[str, dict[str, object]] = {
    # Seconds on a CPU: thick patches like (16, 16, 4) with factor 2.
    "debug": {
        "ae_channels": [8, 8],
        "latent_channels": 2,
        "norm_groups": 4,
        "adv_warmup_epochs": 0,
        "disc_channels": 8,
        "disc_layers": 1,
        "lr_ae": 1e-3,
        "lr_d": 1e-3,
        "unet_channels": [8, 16],
        "unet_res_blocks": 1,
        "unet_attention": False,
        "train_timesteps": 100,
        "lr_diffusion": 1e-3,
        "sample_steps": 4,
        "val_sample_steps": 2,
    },
    # The CPU demo: thick (32, 32, 8) at 5 mm, x5; one halving in the autoencoder (the
    # cheapest to learn; measured: still only 20-27 dB reconstruction PSNR after 100-1000
    # CPU steps), adversarial term off (it needs long runs).
    "demo": {
        "ae_channels": [16, 32],
        "latent_channels": 4,
        "norm_groups": 8,
        "adv_weight": 0.0,
        "lr_ae": 1e-3,
        "unet_channels": [32, 64, 64],
        "unet_res_blocks": 1,
        "unet_attention": False,
        "lr_diffusion": 5e-4,
        "sample_steps": 20,
        "val_sample_steps": 10,
    },
    # A100: thick (64, 64, 16) at 5 mm, x5 (thin 80 slices), latent 4x smaller per axis.
    "a100": {
        "ae_channels": [32, 64, 64],
        "ae_res_blocks": 2,
        "latent_channels": 4,
        "norm_groups": 16,
        "unet_channels": [64, 128, 128],
        "unet_res_blocks": 2,
        "unet_attention": True,
    },
}
