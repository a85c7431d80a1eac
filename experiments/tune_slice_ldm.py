"""Tune slice_ldm (thick -> thin CT slices by latent diffusion) and export the best model.

    python experiments/tune_slice_ldm.py                  # phantom demo x5, CPU, both stages
    python experiments/tune_slice_ldm.py --smoke-test     # < 2 minutes
    python experiments/tune_slice_ldm.py --stage diffusion --init-from exported/<ae-export>
    python experiments/tune_slice_ldm.py --data /scans --spacing 0.8 0.8 5 \
        --patch-size 64 64 16 --option factor=5 --preset a100 \
        --workers-per-trial 8 --gpus-per-worker 1 --address auto --storage s3://bucket/ctray

``--data`` holds thin scans (``*.nii.gz``, thick slices are simulated) and/or one folder per
patient with ``thick.nii.gz`` + ``thin.nii.gz``. ``--spacing`` / ``--patch-size`` describe the
thick input; ``--option factor=F`` sets thin slices per thick slice (5 mm -> 1 mm: 5).
The autoencoder is tuned and exported first, then the denoiser on that export.
"""

from __future__ import annotations

import sys

from ctray.experiment import ExperimentDefaults, run

# Thick 4 x 4 x 5 mm patches of 32 x 32 x 8 (thin 1 mm: 32 x 32 x 40), x5 as in the seed.
DEFAULTS = ExperimentDefaults(
    phantom=6,
    patch_size=(32, 32, 8),
    spacing=(4.0, 4.0, 5.0),
    patches_per_subject=12,
    num_samples=2,
    epochs=6,
    stage_epochs=(("autoencoder", 10), ("diffusion", 6)),
    batch_size=4,
    preset="demo",
    family_options=(("factor", 5),),
)
SMOKE = ExperimentDefaults(
    phantom=3,
    patch_size=(16, 16, 4),
    spacing=(16.0, 16.0, 8.0),
    patches_per_subject=3,
    num_samples=2,
    epochs=2,
    batch_size=2,
    max_train_batches=2,
    max_val_batches=1,
    preset="debug",
    family_options=(("factor", 2),),
)


def main(argv: list[str] | None = None) -> int:
    return run("slice_ldm", argv, defaults=DEFAULTS, smoke=SMOKE)


if __name__ == "__main__":
    sys.exit(main())
