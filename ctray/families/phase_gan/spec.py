"""The phase-GAN FamilySpec: the only object the rest of ctray needs from this family."""

from __future__ import annotations

from ctray.data.phases import PHASES, parse_phase
from ctray.registry import Condition, FamilySpec, Stage

from . import data, steps
from .config import PRESETS, PhaseGANConfig

SPEC = FamilySpec(
    name="phase_gan",
    description="CT contrast-phase translation (arterial, venous, delayed, native) - seed 000",
    config_cls=PhaseGANConfig,
    build_models=steps.build_models,
    stages=(
        Stage(
            name="train",
            trains=("encoder", "phase_code", "generator", "discriminator", "detector"),
            build_optimizers=steps.build_optimizers,
            train_step=steps.train_step,
            eval_step=steps.eval_step,
            preview=steps.preview,
            metric="balanced_mae_hu",
            mode="min",
            inference_models=("encoder", "phase_code", "generator"),
            warmup_epochs=steps.warmup_epochs,
            init=steps.init_pretrained,
        ),
    ),
    predict=steps.predict,
    build_shards=data.build,
    columns=("source", "target", "truth", "labels", "source_phase", "target_phase"),
    baselines=("identity",),
    conditioning={
        "target_phase": Condition(
            parse=parse_phase,
            default=None,
            help=f"phase to generate: {', '.join(PHASES)} (non-contrast) or 0-3",
        ),
    },
    presets=PRESETS,
)
