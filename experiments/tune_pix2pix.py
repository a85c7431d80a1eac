"""Tune pix2pix (paired CT translation on axial slices) and export the best model.

    python experiments/tune_pix2pix.py                   # phantom native -> venous, CPU, <= 10 min
    python experiments/tune_pix2pix.py --smoke-test      # < 2 minutes
    python experiments/tune_pix2pix.py --data /pairs --option resize_to=512 --preset seed \
        --workers-per-trial 8 --gpus-per-worker 1 --address auto --storage s3://bucket/ctray

``--data`` is a folder with trainA/ and trainB/ (optionally testA/ and testB/) or a pairs CSV
(columns a,b). The demo uses 128 px slices so it fits 2 CPU cores; 256 / 512 px (unet_256 /
unet_512) are for GPUs.
"""

from __future__ import annotations

import argparse
import sys

from ctray.experiment import ExperimentDefaults, run
from ctray.families.pix2pix.data import phantom_pair
from ctray.families.pix2pix.evaluate import evaluate_pair, mean_metrics
from ctray.modeldir import find_models, load_model

DEFAULTS = ExperimentDefaults(
    phantom=6,
    patch_size=(128, 128, 1),
    num_samples=4,
    epochs=5,
    batch_size=8,
    preset="demo",
    family_options=(("resize_to", 128), ("max_slices", 24)),
)
SMOKE = ExperimentDefaults(
    phantom=3,
    patch_size=(32, 32, 1),
    num_samples=2,
    epochs=2,
    batch_size=4,
    max_train_batches=3,
    max_val_batches=2,
    preset="debug",
    family_options=(("resize_to", 32), ("max_slices", 8)),
)


HELD_OUT = (1000, 1001)  # phantom seeds no demo build uses


def held_out_summary(argv: list[str] | None) -> None:
    """Per-volume metrics of the newest exported model on unseen phantom pairs (demo data only)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--export", default="exported")
    parser.add_argument("--data")
    args, _ = parser.parse_known_args(argv)
    if args.data:
        return  # real pairs: use ctray.families.pix2pix.evaluate.evaluate_pairs on testA/testB
    newest = max(find_models(args.export), key=lambda p: (p / "model.json").stat().st_mtime)
    model = load_model(newest)
    per_volume = {f"phantom-{s}": evaluate_pair(model, *phantom_pair(s)) for s in HELD_OUT}
    shown = {k: round(v, 3) for k, v in mean_metrics(per_volume).items()}
    print(f"held-out phantom volumes ({len(HELD_OUT)}), whole-volume metrics: {shown}")


def main(argv: list[str] | None = None) -> int:
    rc = run("pix2pix", argv, defaults=DEFAULTS, smoke=SMOKE)
    if rc == 0:
        held_out_summary(argv)
    return rc


if __name__ == "__main__":
    sys.exit(main())
