"""Thick-slice simulator and the linear / cubic z-interpolation baselines (slab-centre geometry)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctray.data.nifti import Volume
from ctray.data.thick_slices import (
    ThickSliceConfig,
    cubic_z,
    linear_z,
    profile_weights,
    simulate_thick,
    thick_affine,
    thick_from_thin,
    thin_affine,
)


def _thin_volume(depth: int = 23, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 100.0)
    return Volume(array=rng.normal(0, 100, (6, 5, depth)).astype(np.float32), affine=affine)


@pytest.mark.parametrize("profile", ["box", "gaussian"])
def test_slab_average_is_exact_on_a_constant_volume(profile: str) -> None:
    thin = np.full((4, 3, 20), 42.5, dtype=np.float32)
    thick = thick_from_thin(thin, 5, profile)
    assert thick.shape == (4, 3, 4) and thick.dtype == np.float32
    np.testing.assert_allclose(thick, 42.5, rtol=1e-6)
    weights, _ = profile_weights(5, profile)
    assert weights.sum() == pytest.approx(1.0) and np.allclose(weights, weights[::-1])


def test_box_profile_is_the_slab_mean_for_numpy_and_torch() -> None:
    thin = np.random.default_rng(1).random((3, 2, 12)).astype(np.float32)
    expected = thin.reshape(3, 2, 4, 3).mean(-1)
    np.testing.assert_allclose(thick_from_thin(thin, 3), expected, rtol=1e-6)
    out = thick_from_thin(torch.from_numpy(thin)[None, None], 3)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1, 3, 2, 4)
    np.testing.assert_allclose(out[0, 0].numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="crop the thin volume to a multiple of 5"):
        thick_from_thin(thin[..., :11], 5)


def test_simulator_keeps_the_truth_and_places_thick_slices_at_slab_centres() -> None:
    thin = _thin_volume(depth=23)
    thick, truth = simulate_thick(thin, ThickSliceConfig(factor=5))
    assert truth.shape == (6, 5, 20) and thick.shape == (6, 5, 4)  # 23 -> 4 whole slabs
    np.testing.assert_array_equal(truth.array, thin.array[:, :, :20])
    np.testing.assert_array_equal(truth.affine, thin.affine)
    assert thick.spacing == pytest.approx((0.8, 0.8, 5.0))
    for k in range(4):  # world z of thick slice k = mean world z of its slab's thin slices
        slab = [(thin.affine @ [0, 0, k * 5 + j, 1])[2] for j in range(5)]
        assert (thick.affine @ [0, 0, k, 1])[2] == pytest.approx(np.mean(slab))
    np.testing.assert_allclose(thin_affine(thick_affine(thin.affine, 5), 5), thin.affine)


def test_simulator_noise_is_added_on_the_thick_slices_only() -> None:
    thin = Volume(array=np.zeros((16, 16, 40), np.float32), affine=np.eye(4))
    quiet, _ = simulate_thick(thin, ThickSliceConfig(factor=4))
    noisy, truth = simulate_thick(
        thin, ThickSliceConfig(factor=4, noise_sd=20.0), rng=np.random.default_rng(0)
    )
    assert np.all(quiet.array == 0) and np.all(truth.array == 0)
    assert noisy.array.std() == pytest.approx(20.0, rel=0.15)
    with pytest.raises(ValueError, match="slice profile"):
        ThickSliceConfig(profile="triangle")  # type: ignore[arg-type]


def test_baselines_interpolate_along_z_only_with_slab_centre_geometry() -> None:
    f = 5
    z = torch.arange(40, dtype=torch.float32)
    ramp = (0.3 * z + 2.0).view(1, 1, 1, 1, 40).expand(2, 1, 3, 4, 40)
    thick = thick_from_thin(ramp, f)  # slab means = the ramp at slab centres
    for up in (linear_z, cubic_z):
        out = up(thick, f)
        assert out.shape == (2, 1, 3, 4, 40)
        # exact wherever the stencil has real neighbours: linear between the first and last
        # centre, cubic one thick slice further in
        inner = slice(2, 38) if up is linear_z else slice(7, 33)
        torch.testing.assert_close(out[..., inner], ramp[..., inner], atol=1e-5, rtol=0)
    # cubic (Catmull-Rom) also reproduces a quadratic sampled at the slab centres
    centres = torch.arange(8, dtype=torch.float32) * f + (f - 1) / 2
    quad = (0.1 * centres) ** 2
    out = cubic_z(quad.view(1, 1, 1, 1, 8), f)[0, 0, 0, 0]
    torch.testing.assert_close(out[7:33], (0.1 * z[7:33]) ** 2, atol=1e-4, rtol=0)
    # in-plane voxels never mix, factor 1 is the identity
    rand = torch.rand(1, 1, 3, 4, 6)
    torch.testing.assert_close(cubic_z(rand, 1), rand)
    torch.testing.assert_close(linear_z(rand, 1), rand)
    col = cubic_z(rand, 3)[0, 0, 1, 2]
    torch.testing.assert_close(col, cubic_z(rand[:, :, 1:2, 2:3], 3)[0, 0, 0, 0])
