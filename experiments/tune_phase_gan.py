"""Tune the phase GAN (CT contrast-phase translation) and export the best model.

    python experiments/tune_phase_gan.py                  # phantom demo, local Ray, CPU
    python experiments/tune_phase_gan.py --smoke-test     # < 2 minutes
    python experiments/tune_phase_gan.py --data /scans --workers-per-trial 8 \
        --gpus-per-worker 1 --address auto --storage s3://bucket/ctray
"""

from __future__ import annotations

import sys

from ctray.experiment import ExperimentDefaults, run

DEFAULTS = ExperimentDefaults(preset="demo", patch_size=(32, 32, 16))
SMOKE = ExperimentDefaults(
    phantom=3,
    patch_size=(16, 16, 16),
    spacing=(8.0, 8.0, 8.0),
    patches_per_subject=2,
    num_samples=2,
    epochs=3,
    batch_size=2,
    max_train_batches=3,
    max_val_batches=2,
    preset="debug",
)


def main(argv: list[str] | None = None) -> int:
    return run("phase_gan", argv, defaults=DEFAULTS, smoke=SMOKE)


if __name__ == "__main__":
    sys.exit(main())
