"""The slice_ldm FamilySpec: the only object the rest of ctray needs from this family."""

from __future__ import annotations

from ctray.registry import FamilySpec, Stage

from . import data, steps
from .config import PRESETS, SliceLDMConfig

SPEC = FamilySpec(
    name="slice_ldm",
    description="thick -> thin CT slices by latent diffusion, AutoencoderKL + 3D U-Net - seed 002",
    config_cls=SliceLDMConfig,
    build_models=steps.build_models,
    stages=(
        Stage(
            name="autoencoder",
            trains=("autoencoder", "discriminator"),
            build_optimizers=steps.build_ae_optimizers,
            train_step=steps.ae_train_step,
            eval_step=steps.ae_eval_step,
            preview=steps.ae_preview,
            metric="recon_psnr",
            mode="max",
            # The discriminator rides along only because the loop loads every module an
            # earlier stage trained into the next stage (frozen); stage 2 never uses it.
            inference_models=("autoencoder",),
            loop_defaults={"grad_clip": 1.0},
        ),
        Stage(
            name="diffusion",
            trains=("denoiser",),
            build_optimizers=steps.build_diffusion_optimizers,
            train_step=steps.diffusion_train_step,
            eval_step=steps.diffusion_eval_step,
            preview=steps.diffusion_preview,
            metric="psnr",
            mode="max",
            inference_models=("autoencoder", "denoiser"),
            ema=("denoiser",),
            # Sampling makes validation costly. The loop's EMA has no warm-up, so its decay is
            # kept short enough (half-life ~70 steps) for CPU runs of a few hundred steps.
            loop_defaults={"val_every": 2, "grad_clip": 1.0, "ema_decay": 0.995},
        ),
    ),
    predict=steps.predict,
    build_shards=data.build,
    columns=("thick", "thin", "body"),
    baselines=("linear", "cubic"),
    presets=PRESETS,
)
