"""The phase-GAN FamilySpec: the only object the rest of ctray needs from this family."""

from __future__ import annotations

from ctray.data.phases import PHASES, parse_phase
from ctray.registry import Condition, FamilySpec

from . import data, steps
from .config import PRESETS, PhaseGANConfig

SPEC = FamilySpec(
    name="phase_gan",
    description="CT contrast-phase translation (arterial, venous, delayed, native) - seed 000",
    config_cls=PhaseGANConfig,
    build_models=steps.build_models,
    build_optimizers=steps.build_optimizers,
    train_step=steps.train_step,
    eval_step=steps.eval_step,
    predict=steps.predict,
    preview=steps.preview,
    build_shards=data.build,
    columns=("source", "target", "truth", "labels", "source_phase", "target_phase"),
    metric="mae_hu",
    mode="min",
    inference_models=("encoder", "phase_code", "generator"),
    conditioning={
        "target_phase": Condition(
            parse=parse_phase,
            default=None,
            help=f"phase to generate: {', '.join(PHASES)} (non-contrast) or 0-3",
        ),
    },
    presets=PRESETS,
)
