"""The torch DRR projector: path lengths, beam geometries, mirror symmetry, gradients, lifting."""

from __future__ import annotations

import math

import pytest
import torch

from ctray.data.drr import (
    DRRGeometry,
    Projector,
    add_poisson_noise,
    backproject,
    detector_grid,
    drr,
    fit_pixel_mm,
    hu_to_mu,
    normalise_views,
    project,
    view_name,
)

torch.set_num_threads(1)

SHAPE = (16, 20, 24)
SPACING = (2.0, 2.0, 2.0)  # a 32 x 40 x 48 mm box


def _parallel(angles=(0.0, 90.0), detector=(32, 32), pixel=1.0) -> DRRGeometry:
    return DRRGeometry(beam="parallel", angles=angles, detector=detector, pixel_mm=(pixel, pixel))


def test_constant_box_integrates_to_its_path_length() -> None:
    mu = 0.02
    vol = torch.full((1, *SHAPE), mu)
    p = project(vol, SPACING, _parallel(angles=(0.0, 90.0)), step_mm=0.25)
    # AP rays run along y (40 mm), lateral rays along x (32 mm), at every pixel inside the box.
    assert p[0, 0, 10:22, 12:20] == pytest.approx(torch.full((12, 8), mu * 40.0), rel=2e-3)
    assert p[0, 1, 10:22, 12:20] == pytest.approx(torch.full((12, 8), mu * 32.0), rel=2e-3)
    # Rows are z (48 mm tall: 48 pixels of 1 mm; the box covers rows 0..31 of 32 -> all).
    assert p[0, 0].amax() == pytest.approx(mu * 40.0, rel=2e-3)
    # Beyond the box's sides (x: 32 mm = pixels 0..31 of a 32-px AP row; y: 40 mm) nothing.
    wide = project(vol, SPACING, _parallel(angles=(90.0,), detector=(32, 64)), step_mm=0.25)
    assert wide[0, 0, :, :8].abs().max() < 1e-6 and wide[0, 0, :, -8:].abs().max() < 1e-6
    # Cone beam: the central ray at 0 deg runs along y through the centre.
    cone = DRRGeometry(beam="cone", angles=(0.0,), detector=(33, 33), pixel_mm=(1.0, 1.0))
    c = project(vol, SPACING, cone, step_mm=0.25)
    assert float(c[0, 0, 16, 16]) == pytest.approx(mu * 40.0, rel=2e-3)
    # An oblique ray (45 deg) through the centre leaves through the x faces: 16 / sin 45 * 2.
    oblique = project(vol, SPACING, _parallel(angles=(45.0,), detector=(33, 33)), step_mm=0.1)
    assert float(oblique[0, 0, 16, 16]) == pytest.approx(mu * 32.0 * math.sqrt(2), rel=1e-2)


def test_hu_to_attenuation_and_drr() -> None:
    hu = torch.tensor([-1000.0, -2000.0, 0.0, 1000.0])
    assert hu_to_mu(hu, 0.02).tolist() == pytest.approx([0.0, 0.0, 0.02, 0.04])
    water = torch.zeros(1, *SHAPE)  # 0 HU everywhere
    p = drr(water, SPACING, _parallel(angles=(0.0,)), step_mm=0.25)
    assert float(p[0, 0, 16, 16]) == pytest.approx(0.02 * 40.0, rel=2e-3)


def test_cone_beam_tends_to_the_parallel_beam() -> None:
    torch.manual_seed(0)
    vol = torch.rand(2, *SHAPE) * 0.03
    angles = (0.0, 30.0, 90.0, 200.0)
    parallel = project(vol, SPACING, _parallel(angles=angles))
    far = DRRGeometry(beam="cone", angles=angles, detector=(32, 32), pixel_mm=(1.0, 1.0),
                      sid_mm=1e6, sdd_mm=1e6 + 1e-3)  # fmt: skip
    cone = project(vol, SPACING, far)
    assert cone.shape == parallel.shape == (2, 4, 32, 32)
    assert torch.allclose(cone, parallel, atol=1e-4 * float(parallel.abs().max()))
    # ...and a close source magnifies: the 32 mm wide box covers ~2x as many 1 mm pixels.
    near = DRRGeometry(beam="cone", angles=(90.0,), detector=(8, 128), pixel_mm=(1.0, 1.0),
                       sid_mm=100.0, sdd_mm=200.0)  # fmt: skip
    ones = torch.full((1, *SHAPE), 0.02)
    wide = _parallel(angles=(90.0,), detector=(8, 128))
    covered_near = int((project(ones, SPACING, near)[0, 0, 4] > 0.01).sum())
    covered_parallel = int((project(ones, SPACING, wide)[0, 0, 4] > 0.01).sum())
    assert covered_parallel == pytest.approx(40, abs=2)  # the y side seen from the side
    assert covered_near > 1.8 * covered_parallel


def test_opposite_views_mirror() -> None:
    torch.manual_seed(1)
    vol = torch.rand(1, *SHAPE) * 0.03
    p = project(vol, SPACING, _parallel(angles=(0.0, 180.0, 90.0, 270.0)))
    assert torch.allclose(p[0, 0], p[0, 1].flip(-1), atol=1e-5)
    assert torch.allclose(p[0, 2], p[0, 3].flip(-1), atol=1e-5)
    assert not torch.allclose(p[0, 0], p[0, 0].flip(-1), atol=1e-3)  # not trivially symmetric


def test_image_orientation_conventions() -> None:
    """AP: the patient's right (+x) on the image's left, superior (+z) at the top row."""
    vol = torch.zeros(1, *SHAPE)
    vol[0, -3:, :, -3:] = 0.05  # a rod at the right (+x), superior (+z) corner, along y
    ap = project(vol, SPACING, _parallel(angles=(0.0,), detector=(48, 32)))[0, 0]
    rows, cols = torch.nonzero(ap > 0.1, as_tuple=True)
    assert rows.float().mean() < 8 and cols.float().mean() < 8
    lateral = project(vol, SPACING, _parallel(angles=(90.0,), detector=(48, 40)))[0, 0]
    assert float(lateral[:8].sum()) > 0 and float(lateral[-8:].sum()) == 0.0
    assert [view_name(a) for a in (0, 90, 180, 270, 45, 22.5)] == [
        "ap", "lateral", "pa", "lateral_left", "angle45", "angle22p5",
    ]  # fmt: skip


def test_gradients_flow_through_the_projector() -> None:
    vol = (torch.rand(1, *SHAPE) * 0.03).requires_grad_(True)
    geometry = DRRGeometry(beam="cone", angles=(0.0, 90.0), detector=(16, 16), pixel_mm=(4.0, 4.0))
    proj = Projector(geometry, SHAPE, SPACING)
    target = proj(torch.rand(1, *SHAPE) * 0.03).detach()
    loss = (proj(vol) - target).abs().mean()
    loss.backward()
    assert vol.grad is not None and torch.isfinite(vol.grad).all()
    assert vol.grad.abs().sum() > 0
    # Linear in the volume: the projection of a sum is the sum of projections.
    a, b = torch.rand(1, *SHAPE), torch.rand(1, *SHAPE)
    assert torch.allclose(proj(a + b), proj(a) + proj(b), atol=1e-5)
    with pytest.raises(ValueError, match="projector built for"):
        proj(torch.rand(1, 8, 8, 8))


@pytest.mark.parametrize("beam", ["parallel", "cone"])
def test_back_projection_finds_the_projected_blob(beam: str) -> None:
    """The lifting (detector_grid) traces the rays the projector integrates along."""
    shape, spacing = (16, 16, 16), (4.0, 4.0, 4.0)
    vol = torch.zeros(1, *shape)
    vol[0, 11:13, 3:5, 9:11] = 1.0
    extent = [n * s for n, s in zip(shape, spacing, strict=True)]
    pixel = fit_pixel_mm(beam=beam, detector=(32, 32), extent_mm=extent, sid_mm=300, sdd_mm=450)
    geometry = DRRGeometry(beam=beam, angles=(0.0, 90.0), detector=(32, 32),
                           pixel_mm=(pixel, pixel), sid_mm=300.0, sdd_mm=450.0)  # fmt: skip
    views = project(vol, spacing, geometry)
    grid = detector_grid(geometry, shape, spacing)
    smears = backproject(views[:, :, None], grid, shape)  # (1, V, 1, X, Y, Z)
    assert smears.shape == (1, 2, 1, *shape)
    both = smears[0, 0, 0] * smears[0, 1, 0]  # where the two views' rays cross
    peak = torch.nonzero(both == both.max())[0].tolist()
    assert 10 <= peak[0] <= 13 and 2 <= peak[1] <= 5 and 8 <= peak[2] <= 11
    # Every voxel centre falls on the detector at the fitted pixel size, from any angle.
    any_angle = DRRGeometry(beam=beam, angles=tuple(range(0, 360, 15)), detector=(32, 32),
                            pixel_mm=(pixel, pixel), sid_mm=300.0, sdd_mm=450.0)  # fmt: skip
    assert float(detector_grid(any_angle, shape, spacing).abs().max()) <= 1.0


def test_poisson_noise_and_normalisation() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.full((1, 2, 64, 64), 2.0)
    noisy = add_poisson_noise(p, 1e6, generator=gen)
    assert float(noisy.mean()) == pytest.approx(2.0, abs=0.01)
    assert 0.001 < float(noisy.std()) < 0.05  # ~ 1 / sqrt(1e6 * e^-2)
    assert float(add_poisson_noise(p, 1e2, generator=gen).std()) > float(noisy.std())
    with pytest.raises(ValueError, match="photons"):
        add_poisson_noise(p, 0.0)
    ramp = torch.linspace(0, 10, 100).reshape(1, 1, 10, 10) * 3 + 5
    n = normalise_views(ramp, quantile=0.0)
    assert float(n.min()) == pytest.approx(0.0) and float(n.max()) == pytest.approx(1.0)
    assert torch.allclose(normalise_views(ramp * 7 + 2), normalise_views(ramp), atol=1e-5)


def test_geometry_validation() -> None:
    with pytest.raises(ValueError, match="sid_mm < sdd_mm"):
        DRRGeometry(beam="cone", sid_mm=1000.0, sdd_mm=900.0)
    with pytest.raises(ValueError, match="at least one view"):
        DRRGeometry(angles=())
    with pytest.raises(ValueError, match="beam"):
        DRRGeometry(beam="fan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inside the volume"):
        fit_pixel_mm(beam="cone", detector=(8, 8), extent_mm=(400, 400, 400), sid_mm=100)
    g = DRRGeometry(beam="cone", angles=(0.0, 90.0))
    assert g.magnification == 1.5 and g.views == 2 and len(g.as_vector()) == 8
    assert g.describe()["pixel_spacing_at"] == "detector"
