"""The pix2pix FamilySpec: the only object the rest of ctray needs from this family."""

from __future__ import annotations

from ctray.registry import FamilySpec

from . import data, steps
from .config import PRESETS, Pix2PixConfig

SPEC = FamilySpec(
    name="pix2pix",
    description="paired CT translation on axial slices, pix2pix U-Net + PatchGAN - seed 001",
    config_cls=Pix2PixConfig,
    build_models=steps.build_models,
    build_optimizers=steps.build_optimizers,
    train_step=steps.train_step,
    eval_step=steps.eval_step,
    predict=steps.predict,
    preview=steps.preview,
    build_shards=data.build,
    columns=("a", "b", "labels"),
    metric="mae_hu",
    mode="min",
    inference_models=("generator",),
    presets=PRESETS,
)
