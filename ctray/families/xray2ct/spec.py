"""The xray2ct FamilySpec: the only object the rest of ctray needs from this family."""

from __future__ import annotations

from ctray.registry import FamilySpec, Stage, ViewInputs

from . import data, steps
from .config import PRESETS, XRay2CTConfig

SPEC = FamilySpec(
    name="xray2ct",
    description="CT volume from N X-ray views (DRRs), cross-view attention + Swin - seed 003",
    config_cls=XRay2CTConfig,
    build_models=steps.build_models,
    stages=(
        Stage(
            name="train",
            trains=("net",),
            build_optimizers=steps.build_optimizers,
            train_step=steps.train_step,
            eval_step=steps.eval_step,
            preview=steps.preview,
            metric="psnr",
            mode="max",
            inference_models=("net",),
            loop_defaults={"grad_clip": 1.0},
        ),
    ),
    predict=steps.predict,
    build_shards=data.build,
    columns=("views", "ct", "body", "angles", "geometry"),
    baselines=("mean", "backprojection"),
    views=ViewInputs(
        describe=steps.describe_views,
        prepare=steps.prepare_view_inputs,
        output_grid=steps.output_grid,
        render=steps.render_view_inputs,
    ),
    presets=PRESETS,
)
