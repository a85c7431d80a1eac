"""The pix2pix FamilySpec: the only object the rest of ctray needs from this family."""

from __future__ import annotations

from ctray.registry import FamilySpec, Stage

from . import data, steps
from .config import PRESETS, Pix2PixConfig

SPEC = FamilySpec(
    name="pix2pix",
    description="paired CT translation on axial slices, pix2pix U-Net + PatchGAN - seed 001",
    config_cls=Pix2PixConfig,
    build_models=steps.build_models,
    stages=(
        Stage(
            name="train",
            trains=("generator", "discriminator"),
            build_optimizers=steps.build_optimizers,
            train_step=steps.train_step,
            eval_step=steps.eval_step,
            preview=steps.preview,
            metric="mae_hu",
            mode="min",
            inference_models=("generator",),
        ),
    ),
    predict=steps.predict,
    build_shards=data.build,
    columns=("a", "b", "labels"),
    baselines=("identity",),
    presets=PRESETS,
)
