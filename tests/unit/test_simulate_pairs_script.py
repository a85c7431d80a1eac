"""experiments/simulate_pairs.py on the real labelled CT: aligned native/venous pairs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ctray.data.nifti import load_nifti

SCRIPTS = Path(__file__).resolve().parents[2] / "experiments"


def _main():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import simulate_pairs
    finally:
        sys.path.remove(str(SCRIPTS))
    return simulate_pairs.main


def test_writes_train_and_test_pairs_on_the_input_grid(real_ct_dir: Path, tmp_path: Path) -> None:
    assert _main()(["--input", str(real_ct_dir), "--out", str(tmp_path), "--phase", "venous"]) == 0
    src = load_nifti(real_ct_dir / "abdomen_native.nii.gz")
    seg = load_nifti(real_ct_dir / "abdomen_native_seg.nii.gz", dtype=np.uint8).array
    a = load_nifti(tmp_path / "trainA" / "abdomen_native.nii.gz")
    b = load_nifti(tmp_path / "trainB" / "abdomen_native.nii.gz")
    assert a.shape == b.shape == src.shape
    np.testing.assert_allclose(b.affine, src.affine)
    np.testing.assert_allclose(a.array, src.array, atol=0.5)  # A is the native scan itself
    aorta = seg == 52
    assert 100 < float((b.array - a.array)[aorta].mean()) < 200  # venous aorta: +110..+140 HU
    assert (tmp_path / "testB" / "abdomen_native-sim1.nii.gz").is_file()


def test_unknown_phase_is_a_clear_error(real_ct_dir: Path, tmp_path: Path, capsys) -> None:
    assert (
        _main()(["--input", str(real_ct_dir), "--out", str(tmp_path), "--phase", "portal-arterial"])
        == 2
    )
    assert "unknown phase 'portal-arterial'" in capsys.readouterr().err
