"""Digitally reconstructed radiographs (DRRs): differentiable X-ray projections of a CT in torch.

Physics: HU become linear attenuation ``mu = mu_water * (1 + HU / 1000)`` (1/mm, clamped at 0;
``mu_water`` ~0.02 /mm at ~70 keV), and a detector pixel records the Beer-Lambert line integral
``p = integral of mu along the ray`` (``I = I0 * exp(-p)``). Rays are sampled with trilinear
``grid_sample`` (zero outside the volume, i.e. air), so projections are differentiable with
respect to the volume. Optional Poisson quantum noise draws photon counts ``I ~ Poisson(I0
exp(-p))`` and returns ``-log(I / I0)``.

Coordinates (mm, NIfTI RAS+: +x towards the patient's right, +y anterior, +z superior):

* the volume (X, Y, Z) is canonical RAS with voxel spacing ``spacing``; its centre (the middle
  of its voxel-edge box) sits at the isocentre, the world origin.
* the gantry turns about the z axis. At gantry angle ``a`` the unit vector from the isocentre
  towards the source is ``d = (sin a, cos a, 0)``: 0 deg = AP (source anterior, detector
  posterior), 90 deg = source on the patient's right
  (a left-lateral view: detector on the left), 180 deg = PA.
* images are (H, W) = (rows, columns) as seen from the source: row 0 is the superior end
  (rows run along -z), columns run along ``e_u = (-cos a, sin a, 0)`` (the viewer's right),
  so an AP image shows the patient's right side on its left, as radiographs are displayed.
* parallel beam: pixel spacing is at the isocentre. Cone beam: the source sits ``sid_mm`` from
  the isocentre and the detector ``sdd_mm`` from the source (magnification sdd/sid at the
  isocentre); pixel spacing is at the detector.

Each ray is sampled at ``samples`` evenly spaced midpoints of its chord through the volume's
box (grown by half a voxel, where trilinear interpolation still sees the edge voxels), so a
constant cube integrates to its exact path length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MU_WATER",
    "DRRGeometry",
    "Projector",
    "add_poisson_noise",
    "backproject",
    "detector_grid",
    "drr",
    "fit_pixel_mm",
    "hu_to_mu",
    "normalise_views",
    "project",
    "view_name",
]

MU_WATER = 0.02  # 1/mm, water at ~70 keV effective energy
Beam = Literal["parallel", "cone"]


@dataclass(frozen=True, kw_only=True)
class DRRGeometry:
    """Projection geometry of a set of views (see the module docstring for the conventions).

    Attributes:
        beam: ``parallel`` or ``cone`` (a point source, flat detector).
        angles: gantry angles in degrees, one per view (0 = AP, 90 = lateral).
        detector: (rows, columns) pixels.
        pixel_mm: (row, column) pixel spacing in mm; at the isocentre for a parallel beam, at
            the detector for a cone beam.
        sid_mm: source to isocentre distance (cone beam).
        sdd_mm: source to detector distance (cone beam).
        mu_water: attenuation of water, 1/mm.
    """

    beam: Beam = "cone"
    angles: tuple[float, ...] = (0.0, 90.0)
    detector: tuple[int, int] = (128, 128)
    pixel_mm: tuple[float, float] = (3.0, 3.0)
    sid_mm: float = 1000.0
    sdd_mm: float = 1500.0
    mu_water: float = MU_WATER

    def __post_init__(self) -> None:
        if self.beam not in ("parallel", "cone"):
            raise ValueError(f"beam must be 'parallel' or 'cone', got {self.beam!r}")
        if not self.angles:
            raise ValueError("a DRR geometry needs at least one view angle")
        if len(self.detector) != 2 or min(self.detector) < 1:
            raise ValueError(f"detector must be (rows, columns) >= 1, got {self.detector}")
        if len(self.pixel_mm) != 2 or min(self.pixel_mm) <= 0:
            raise ValueError(f"pixel_mm must be 2 positive mm, got {self.pixel_mm}")
        if self.beam == "cone" and not 0 < self.sid_mm < self.sdd_mm:
            raise ValueError(
                f"cone beam needs 0 < sid_mm < sdd_mm, got sid {self.sid_mm}, sdd {self.sdd_mm}"
            )
        if self.mu_water <= 0:
            raise ValueError(f"mu_water must be > 0, got {self.mu_water}")

    @property
    def views(self) -> int:
        return len(self.angles)

    @property
    def magnification(self) -> float:
        """Detector size of an object at the isocentre over its true size."""
        return self.sdd_mm / self.sid_mm if self.beam == "cone" else 1.0

    def as_vector(self) -> list[float]:
        """Everything but the angles as numbers (a shard column; compared with a model's)."""
        return [
            0.0 if self.beam == "parallel" else 1.0,
            float(self.sid_mm),
            float(self.sdd_mm),
            float(self.detector[0]),
            float(self.detector[1]),
            float(self.pixel_mm[0]),
            float(self.pixel_mm[1]),
            float(self.mu_water),
        ]

    def describe(self) -> dict[str, object]:
        """Plain-JSON description (for manifests and the view-upload API)."""
        out: dict[str, object] = {
            "beam": self.beam,
            "angles_deg": [float(a) for a in self.angles],
            "detector_px": list(self.detector),
            "pixel_mm": [float(p) for p in self.pixel_mm],
            "pixel_spacing_at": "isocentre" if self.beam == "parallel" else "detector",
            "mu_water_per_mm": self.mu_water,
        }
        if self.beam == "cone":
            out.update(sid_mm=float(self.sid_mm), sdd_mm=float(self.sdd_mm))
        return out


def view_name(angle: float) -> str:
    """The conventional name of a gantry angle: ap, lateral, pa, lateral_left, else angleNN."""
    a = float(angle) % 360.0
    named = {0.0: "ap", 90.0: "lateral", 180.0: "pa", 270.0: "lateral_left"}
    for ref, name in named.items():
        if abs(a - ref) < 1e-6:
            return name
    return f"angle{a:g}".replace(".", "p")


def hu_to_mu(hu: torch.Tensor, mu_water: float = MU_WATER) -> torch.Tensor:
    """Linear attenuation (1/mm) of HU: ``mu_water * (1 + HU / 1000)``, never negative."""
    return (mu_water * (1.0 + hu / 1000.0)).clamp_min(0.0)


def fit_pixel_mm(
    *,
    beam: Beam,
    detector: Sequence[int],
    extent_mm: Sequence[float],
    sid_mm: float = 1000.0,
    sdd_mm: float = 1500.0,
) -> float:
    """Square pixel spacing at which the detector sees the whole volume box from any angle.

    The box's in-plane (x, y) diagonal bounds its width in every view; a cone beam magnifies
    its near side most (the tangent from the source to the bounding circle).
    """
    r = 0.5 * math.hypot(extent_mm[0], extent_mm[1])
    hz = 0.5 * extent_mm[2]
    if beam == "parallel":
        half_w, half_h = r, hz
    else:
        if sid_mm <= r:
            raise ValueError(
                f"the source ({sid_mm} mm from the isocentre) lies inside the volume's "
                f"bounding circle (radius {r:.0f} mm); increase sid_mm"
            )
        half_w = sdd_mm * r / math.sqrt(sid_mm**2 - r**2)
        half_h = sdd_mm * hz / (sid_mm - r)
    return max(2 * half_w / detector[1], 2 * half_h / detector[0])


def _frames(geometry: DRRGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per view: source direction d, detector column axis e_u, row axis e_v (each (V, 3))."""
    a = np.deg2rad(np.asarray(geometry.angles, dtype=np.float64))
    zeros = np.zeros_like(a)
    d = np.stack([np.sin(a), np.cos(a), zeros], axis=1)
    e_u = np.stack([-np.cos(a), np.sin(a), zeros], axis=1)
    e_v = np.tile(np.array([0.0, 0.0, -1.0]), (len(a), 1))
    return d, e_u, e_v


def _pixel_offsets(geometry: DRRGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre offsets (mm) from the detector centre: rows (H,), columns (W,)."""
    h, w = geometry.detector
    rows = (np.arange(h) - (h - 1) / 2.0) * geometry.pixel_mm[0]
    cols = (np.arange(w) - (w - 1) / 2.0) * geometry.pixel_mm[1]
    return rows, cols


def _rays(geometry: DRRGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the ray's point nearest the isocentre and its unit direction, (V, H, W, 3)."""
    d, e_u, e_v = _frames(geometry)
    rows, cols = _pixel_offsets(geometry)
    offset = (
        cols[None, None, :, None] * e_u[:, None, None, :]
        + rows[None, :, None, None] * e_v[:, None, None, :]
    )  # (V, H, W, 3)
    if geometry.beam == "parallel":
        direction = np.broadcast_to(-d[:, None, None, :], offset.shape).copy()
        return offset, direction
    source = geometry.sid_mm * d[:, None, None, :]
    pixel = (geometry.sid_mm - geometry.sdd_mm) * d[:, None, None, :] + offset
    direction = pixel - source
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    along = -(source * direction).sum(-1, keepdims=True)
    return source + along * direction, direction


def _chords(
    base: np.ndarray, direction: np.ndarray, half: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit ``t`` of each ray ``base + t * direction`` through the box ``|x| <= half``
    (slab method); rays that miss it get an empty chord."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / direction
        t1 = (-half - base) * inv
        t2 = (half - base) * inv
    lo = np.where(np.isfinite(t1), np.minimum(t1, t2), -np.inf)
    hi = np.where(np.isfinite(t2), np.maximum(t1, t2), np.inf)
    # Rays parallel to a slab: inside it for every t, or never.
    parallel = direction == 0
    outside = parallel & (np.abs(base) > half)
    lo = np.where(parallel, -np.inf, lo)
    hi = np.where(parallel, np.inf, hi)
    t_in, t_out = lo.max(-1), hi.min(-1)
    miss = outside.any(-1) | (t_out <= t_in)
    return np.where(miss, 0.0, t_in), np.where(miss, 0.0, t_out)


def _volume_half(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    return np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64) / 2.0


class Projector(nn.Module):
    """Line integrals of volumes of one shape and spacing in one geometry (sampling grids cached).

    Args:
        geometry: the views.
        shape: (X, Y, Z) voxels of the volumes to project.
        spacing: voxel size in mm.
        step_mm: nominal sampling step along the longest chord (default: the smallest voxel
            side); every ray gets the same number of samples over its own chord.

    ``forward(mu)`` takes attenuation (B, X, Y, Z) or (B, 1, X, Y, Z) in 1/mm and returns
    line integrals (B, V, H, W).
    """

    def __init__(
        self,
        geometry: DRRGeometry,
        shape: Sequence[int],
        spacing: Sequence[float],
        *,
        step_mm: float | None = None,
    ) -> None:
        super().__init__()
        self.geometry = geometry
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in spacing)
        step = float(step_mm or min(self.spacing))
        data_half = _volume_half(self.shape, self.spacing)
        half = data_half + np.asarray(self.spacing) / 2.0  # trilinear support beyond the edge
        base, direction = _rays(geometry)
        t_in, t_out = _chords(base, direction, half)
        length = t_out - t_in
        self.samples = max(2, math.ceil(float(length.max()) / step))
        frac = (np.arange(self.samples) + 0.5) / self.samples
        t = t_in[..., None] + length[..., None] * frac  # (V, H, W, S)
        points = base[..., None, :] + t[..., None] * direction[..., None, :]
        # grid_sample's last axis is (W, H, D) = (z, y, x), normalised to the voxel-edge box.
        norm = points / data_half
        grid = torch.as_tensor(norm[..., ::-1].copy(), dtype=torch.float32)
        self.register_buffer("grid", grid, persistent=False)
        dt = torch.as_tensor(length / self.samples, dtype=torch.float32)
        self.register_buffer("dt", dt, persistent=False)

    def forward(self, mu: torch.Tensor) -> torch.Tensor:
        if mu.ndim == 5:
            if mu.shape[1] != 1:
                raise ValueError(f"expected one channel, got volumes of {tuple(mu.shape)}")
            mu = mu[:, 0]
        if tuple(mu.shape[1:]) != self.shape:
            raise ValueError(f"projector built for {self.shape} volumes, got {tuple(mu.shape)}")
        # (1, B, X, Y, Z): the batch as channels shares one grid; float32 (bf16 sample
        # coordinates would be off by a fraction of a voxel).
        vol = mu.float().unsqueeze(0)
        out = []
        for v in range(self.grid.shape[0]):
            s = F.grid_sample(
                vol,
                self.grid[v : v + 1],
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )  # (1, B, H, W, S)
            out.append(s[0].sum(-1) * self.dt[v])
        return torch.stack(out, dim=1)


def project(
    mu: torch.Tensor,
    spacing: Sequence[float],
    geometry: DRRGeometry,
    *,
    step_mm: float | None = None,
) -> torch.Tensor:
    """Line integrals (B, V, H, W) of attenuation volumes (B, X, Y, Z) in 1/mm."""
    shape = mu.shape[-3:]
    projector = Projector(geometry, shape, spacing, step_mm=step_mm).to(mu.device)
    return projector(mu)


def drr(
    hu: torch.Tensor,
    spacing: Sequence[float],
    geometry: DRRGeometry,
    *,
    step_mm: float | None = None,
) -> torch.Tensor:
    """Line integrals (B, V, H, W) of HU volumes (B, X, Y, Z) centred on the isocentre."""
    return project(hu_to_mu(hu, geometry.mu_water), spacing, geometry, step_mm=step_mm)


def add_poisson_noise(
    line_integrals: torch.Tensor, photons: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Quantum noise: ``-log(I / I0)`` with ``I ~ Poisson(I0 * exp(-p))`` (at least one count)."""
    if photons <= 0:
        raise ValueError(f"photons per pixel must be > 0, got {photons}")
    expected = photons * torch.exp(-line_integrals.double())
    counts = torch.poisson(expected, generator=generator).clamp_min(1.0)
    return (-torch.log(counts / photons)).to(line_integrals.dtype)


def normalise_views(views: torch.Tensor, *, quantile: float = 0.005) -> torch.Tensor:
    """Scale each image (last two axes) so its ``quantile`` / ``1 - quantile`` map to 0 / 1.

    Per image and calibration-free: DRR line integrals and real radiographs (whose absolute
    scale is unknown) are brought to the same range; not clipped, so differentiable everywhere.
    """
    flat = views.float().flatten(-2)
    q = torch.tensor([quantile, 1.0 - quantile], device=flat.device, dtype=flat.dtype)
    lo_hi = torch.quantile(flat, q, dim=-1)  # (2, ...)
    lo, hi = lo_hi[0][..., None, None], lo_hi[1][..., None, None]
    return (views.float() - lo) / (hi - lo).clamp_min(1e-6)


def detector_grid(
    geometry: DRRGeometry, shape: Sequence[int], spacing: Sequence[float]
) -> torch.Tensor:
    """Where each voxel centre of a (X, Y, Z) grid falls on each view's detector.

    Returns (V, X, Y*Z, 2) ``grid_sample`` coordinates (column, row), normalised to the
    detector's pixel-edge extent (``align_corners=False``); the same for any image size that
    spans the detector, so it serves feature maps of every scale.
    """
    d, e_u, e_v = _frames(geometry)
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]
    p = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (X, Y, Z, 3)
    u = np.einsum("xyzc,vc->vxyz", p, e_u)
    v = np.einsum("xyzc,vc->vxyz", p, e_v)
    if geometry.beam == "cone":
        depth = geometry.sid_mm - np.einsum("xyzc,vc->vxyz", p, d)  # distance from the source
        scale = geometry.sdd_mm / depth
        u, v = u * scale, v * scale
    h, w = geometry.detector
    col = u / (w * geometry.pixel_mm[1] / 2.0)
    row = v / (h * geometry.pixel_mm[0] / 2.0)
    grid = np.stack([col, row], axis=-1).reshape(len(geometry.angles), shape[0], -1, 2)
    return torch.as_tensor(grid, dtype=torch.float32)


def backproject(images: torch.Tensor, grid: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Smear each view's image along its rays: (B, V, C, H, W) -> (B, V, C, X, Y, Z).

    ``grid`` comes from :func:`detector_grid`; voxels whose ray misses the detector get 0.
    An unfiltered back-projection is its mean over views.
    """
    b, v, c, h, w = images.shape
    if grid.shape[0] != v:
        raise ValueError(f"grid for {grid.shape[0]} views, got images of {v} views")
    flat = images.float().permute(1, 0, 2, 3, 4).reshape(v, b * c, h, w)  # views as the batch
    out = F.grid_sample(
        flat, grid.float(), mode="bilinear", padding_mode="zeros", align_corners=False
    )  # (V, B*C, X, Y*Z), in float32 like the projector
    return out.reshape(v, b, c, *shape).permute(1, 0, 2, 3, 4, 5)
