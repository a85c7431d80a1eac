"""Procedural phantom: geometry, determinism, organ coverage, plausible HU and speed."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

from ctray.data.organs import ENHANCING_ORGANS, ORGANS, organ_mask
from ctray.data.phantom import NATIVE_HU, PhantomConfig, make_phantom

SMALL = PhantomConfig(shape=(48, 40, 24), spacing=(8.0, 8.0, 8.0))
REQUIRED = (*ENHANCING_ORGANS, "bowel", "spine", "muscle")


def test_geometry_matches_config() -> None:
    vol, labels = make_phantom(0, config=SMALL)
    assert vol.shape == SMALL.shape == labels.shape
    assert vol.array.dtype == np.float32
    assert labels.dtype == np.uint8
    assert vol.spacing == pytest.approx(SMALL.spacing)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    centre = vol.affine @ np.array([*((np.array(SMALL.shape) - 1) / 2), 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


def test_deterministic_per_seed() -> None:
    a_vol, a_lab = make_phantom(3, config=SMALL)
    b_vol, b_lab = make_phantom(3, config=SMALL)
    np.testing.assert_array_equal(a_vol.array, b_vol.array)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_vol, c_lab = make_phantom(4, config=SMALL)
    assert not np.array_equal(a_lab, c_lab)
    assert not np.array_equal(a_vol.array, c_vol.array)


@pytest.mark.parametrize("seed", range(4))
def test_all_organs_present_with_native_hu(seed: int) -> None:
    vol, labels = make_phantom(seed, config=SMALL)
    for organ in REQUIRED:
        assert organ_mask(labels, organ).any(), f"{organ} missing for seed {seed}"
    for organ in ENHANCING_ORGANS:
        mean = float(vol.array[organ_mask(labels, organ)].mean())
        assert mean == pytest.approx(NATIVE_HU[organ], abs=5.0), organ
    assert set(np.unique(labels)) <= {0, *(i for ids in ORGANS.values() for i in ids)}


def test_tissue_ranges_default_grid() -> None:
    vol, labels = make_phantom(7)
    hu = vol.array
    assert vol.shape == (96, 80, 48)
    assert hu.min() >= -1024 and hu.max() <= 3071
    corner = hu[:5, :5, :]
    assert abs(float(corner.mean()) + 1000) < 5  # air outside the body
    spine = hu[organ_mask(labels, "spine")]
    assert 250 < float(spine.mean()) < 800 and float(np.percentile(spine, 95)) > 500
    assert abs(float(hu[organ_mask(labels, "muscle")].mean()) - 50) < 5
    bowel = hu[organ_mask(labels, "bowel")]
    assert (bowel < -850).any(), "bowel gas pockets expected"
    body = hu > -500
    assert ((hu > -150) & (hu < -50)).sum() > 0.1 * body.sum()  # plenty of fat
    noise = hu[organ_mask(labels, "liver")].std()
    assert 5 < noise < 20


def test_default_phantom_is_fast() -> None:
    make_phantom(0)
    start = time.perf_counter()
    make_phantom(1)
    assert time.perf_counter() - start < 1.0


def test_organ_mask_unknown_name_lists_valid() -> None:
    with pytest.raises(ValueError, match="unknown organ 'heart'; valid: aorta, portal_vein"):
        organ_mask(np.zeros((2, 2, 2), np.uint8), "heart")


def test_bad_config_rejected() -> None:
    with pytest.raises(ValueError):
        PhantomConfig(shape=(2, 40, 24))
    with pytest.raises(ValueError):
        PhantomConfig(spacing=(0.0, 1.0, 1.0))
