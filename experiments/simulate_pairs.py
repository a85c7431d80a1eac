"""Write pix2pix-style pairs (A = native, B = a simulated contrast phase) from labelled scans.

    python experiments/simulate_pairs.py --input ../shared/data/ct --out /tmp/pairs --phase venous

Every ``NAME.nii.gz`` with ``NAME_seg.nii.gz`` (TotalSegmentator labels) gives ``trainA/NAME``
and ``trainB/NAME`` from one simulation and ``testA/NAME-sim1`` / ``testB/NAME-sim1`` from
another (different enhancement draw, the same anatomy: it tests the intensity translation, not
generalisation to new patients), voxel-aligned (not semi-paired).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ctray.data.nifti import NiftiError, load_nifti, save_nifti
from ctray.data.phases import NATIVE_INDEX, SimulatorConfig, parse_phase, simulate_phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--phase", default="venous", help="phase of B (A is native)")
    args = parser.parse_args(argv)
    try:
        target = parse_phase(args.phase)
        scans = [p for p in sorted(args.input.glob("*.nii*")) if "_seg." not in p.name]
        written = 0
        for scan in scans:
            stem = scan.name.split(".nii")[0]
            seg = scan.with_name(f"{stem}_seg{scan.name[len(stem) :]}")
            if not seg.is_file():
                print(f"skipped {scan}: no label map {seg.name}", file=sys.stderr)
                continue
            native = load_nifti(scan)
            labels = load_nifti(seg, dtype=np.uint8).array
            for split, seed, name in (("train", 0, stem), ("test", 1, f"{stem}-sim1")):
                sim = simulate_phases(
                    native,
                    labels,
                    seed=seed,
                    phases=("native", target),
                    config=SimulatorConfig(semi_paired=False),
                )
                for side, phase in (("A", NATIVE_INDEX), ("B", target)):
                    out = args.out / f"{split}{side}" / f"{name}.nii.gz"
                    save_nifti(out, sim[phase].truth, native.affine)
            written += 1
    except (NiftiError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written} pair(s) per split under {args.out}")
    return 0 if written else 2


if __name__ == "__main__":
    sys.exit(main())
