"""The maskgit_fsq FamilySpec: the only object the rest of ctray needs from this family.

Its data are phase_gan's shards (the same builder: simulated phases with the aligned truth in
validation rows), so both families train and are judged on identical data.
"""

from __future__ import annotations

import math

from ctray.data.phases import PHASES, parse_phase
from ctray.families.phase_gan.data import build as build_phase_shards
from ctray.registry import Condition, FamilySpec, Stage

from . import steps
from .config import PRESETS, MaskGITFSQConfig

MAX_STEPS = 64
MAX_TEMPERATURE = 10.0


def parse_steps(raw: str) -> int | None:
    """Decoding steps T from a query string; ``auto``: the model's ``sample_steps``."""
    if raw.strip().lower() == "auto":
        return None
    try:
        steps = int(raw)
    except ValueError:
        steps = 0
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS} or auto, got {raw!r}")
    return steps


def parse_temperature(raw: str) -> float | None:
    """Token sampling temperature from a query string; ``auto``: the model's ``temperature``."""
    if raw.strip().lower() == "auto":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= MAX_TEMPERATURE:
        raise ValueError(
            f"temperature must be a number from 0 (most likely tokens) to {MAX_TEMPERATURE:g} "
            f"or auto, got {raw!r}"
        )
    return value


SPEC = FamilySpec(
    name="maskgit_fsq",
    description="CT contrast-phase translation, FSQ tokenizer + MaskGIT transformer - seed 004",
    config_cls=MaskGITFSQConfig,
    build_models=steps.build_models,
    stages=(
        Stage(
            name="tokenizer",
            trains=("tokenizer", "discriminator"),
            build_optimizers=steps.build_tokenizer_optimizers,
            train_step=steps.tokenizer_train_step,
            eval_step=steps.tokenizer_eval_step,
            preview=steps.tokenizer_preview,
            metric="recon_psnr",
            mode="max",
            # The codebook size is the other objective: the search returns a Pareto front of
            # PSNR against codebook size, and the export is the point the rule picks.
            objectives=(("codebook_size", "min"),),
            select=steps.smallest_codebook_near_best_psnr,
            inference_models=("tokenizer",),
            warmup_epochs=steps.tokenizer_warmup,
            loop_defaults={"grad_clip": 1.0},
        ),
        Stage(
            name="maskgit",
            trains=("transformer",),
            build_optimizers=steps.build_maskgit_optimizers,
            train_step=steps.maskgit_train_step,
            eval_step=steps.maskgit_eval_step,
            preview=steps.maskgit_preview,
            metric="balanced_mae_hu",
            mode="min",
            inference_models=("tokenizer", "transformer"),
            ema=("transformer",),
            # Decoding makes validation costly (T forward passes). The loop's EMA warms up its
            # decay; 0.995 (half-life ~140 steps) suits CPU runs of a few hundred steps.
            loop_defaults={"grad_clip": 1.0, "ema_decay": 0.995, "val_every": 2},
        ),
    ),
    predict=steps.predict,
    build_shards=build_phase_shards,
    columns=("source", "target", "truth", "labels", "source_phase", "target_phase"),
    baselines=("identity",),
    conditioning={
        "target_phase": Condition(
            parse=parse_phase,
            default=None,
            help=f"phase to generate: {', '.join(PHASES)} (non-contrast) or 0-3",
        ),
        "steps": Condition(
            parse=parse_steps,
            default="auto",
            help=f"decoding steps T, 1-{MAX_STEPS} (auto: the model's validated sample_steps)",
        ),
        "temperature": Condition(
            parse=parse_temperature,
            default="auto",
            help="token sampling temperature, 0 = most likely tokens (auto: the model's)",
        ),
    },
    presets=PRESETS,
    data_family="phase_gan",
)
