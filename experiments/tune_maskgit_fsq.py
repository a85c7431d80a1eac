"""Tune maskgit_fsq (FSQ tokenizer + MaskGIT, CT contrast-phase translation) and export it.

    python experiments/tune_maskgit_fsq.py                  # phantom demo, CPU, both stages
    python experiments/tune_maskgit_fsq.py --smoke-test     # < 2 minutes
    python experiments/tune_maskgit_fsq.py --stage maskgit --init-from exported/<tokenizer-export>
    python experiments/tune_maskgit_fsq.py --data /scans --patch-size 64 64 64 --preset a100 \
        --workers-per-trial 8 --gpus-per-worker 1 --address auto --storage s3://bucket/ctray

``--data`` is what phase_gan reads (native scans with ``NAME_seg`` labels, phases simulated, or
one folder per patient with a file per phase); the shards are phase_gan's. The tokenizer is
tuned first over FSQ level tuples (a Pareto front of PSNR against codebook size; the export is
the smallest codebook within 0.5 dB of the best PSNR), then the transformer on that export.
"""

from __future__ import annotations

import sys

from ctray.experiment import ExperimentDefaults, run

# Native -> arterial / venous / delayed on 32 x 32 x 16 patches at 4 mm (8 x 8 x 4 = 256
# tokens), one target phase per patch position (16 positions per subject: 96 training rows from
# 6 phantoms). Four tokenizer trials (two level tuples fixed, two drawn) of 4 epochs, then two
# transformer trials of 20 epochs (an epoch of the transformer costs a tenth of the tokenizer's).
DEFAULTS = ExperimentDefaults(
    phantom=8,
    patch_size=(32, 32, 16),
    spacing=(4.0, 4.0, 4.0),
    patches_per_subject=16,
    epochs=6,
    stage_epochs=(("tokenizer", 4), ("maskgit", 20)),
    stage_samples=(("tokenizer", 4), ("maskgit", 2)),
    batch_size=4,
    preset="demo",
    family_options=(("source_phases", ("native",)), ("pairs_per_patch", 1)),
)
SMOKE = ExperimentDefaults(
    phantom=3,
    patch_size=(16, 16, 16),
    spacing=(8.0, 8.0, 8.0),
    patches_per_subject=2,
    epochs=2,
    stage_samples=(("tokenizer", 2), ("maskgit", 1)),
    batch_size=2,
    max_train_batches=2,
    max_val_batches=1,
    preset="debug",
    family_options=(("source_phases", ("native",)),),
)


def main(argv: list[str] | None = None) -> int:
    return run("maskgit_fsq", argv, defaults=DEFAULTS, smoke=SMOKE)


if __name__ == "__main__":
    sys.exit(main())
