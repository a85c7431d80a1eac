"""Tune xray2ct (a CT volume from two or N X-ray views) and export the best model.

    python experiments/tune_xray2ct.py                   # phantom DRRs, CPU, <= 10 min
    python experiments/tune_xray2ct.py --smoke-test      # < 2 minutes
    python experiments/tune_xray2ct.py --data /cts --patch-size 128 128 128 \
        --spacing 2.5 2.5 2.5 --preset a100 --workers-per-trial 4 --gpus-per-worker 1 \
        --address auto --storage s3://bucket/ctray

``--data`` is a folder of CTs (``NAME.nii.gz``: views are rendered as DRRs) and/or paired
studies (``NAME/ct.nii.gz`` + ``ap.png``, ``lateral.tif`` ...). The patch size and spacing are
the output CT grid, centred on each scan. The demo reconstructs 32^3 volumes (12 x 8 x 6 mm
voxels: the whole phantom) from 32^2 cone-beam DRRs; each phantom gives 6 samples (the scan
and 5 rigidly moved copies). Its validation prints the model beside the mean training volume
and the least-squares-scaled back-projection.
"""

from __future__ import annotations

import sys

from ctray.experiment import ExperimentDefaults, run

DEFAULTS = ExperimentDefaults(
    phantom=8,
    patch_size=(32, 32, 32),
    spacing=(12.0, 8.0, 6.0),
    patches_per_subject=6,
    num_samples=4,
    epochs=10,
    batch_size=4,
    preset="demo",
)
SMOKE = ExperimentDefaults(
    phantom=3,
    patch_size=(16, 16, 16),
    spacing=(24.0, 16.0, 12.0),
    patches_per_subject=2,
    num_samples=2,
    epochs=2,
    batch_size=2,
    max_train_batches=2,
    max_val_batches=1,
    preset="debug",
)


def main(argv: list[str] | None = None) -> int:
    return run("xray2ct", argv, defaults=DEFAULTS, smoke=SMOKE)


if __name__ == "__main__":
    sys.exit(main())
