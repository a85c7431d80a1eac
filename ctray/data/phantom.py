"""Procedural native (non-contrast) abdominal CT phantom with TotalSegmentator-style labels.

The project cannot ship patient data, so the demo, tests and debug presets use this phantom:
a seeded, anatomically plausible axial abdomen (body wall, spine, muscles, solid organs,
vessels, bowel gas) whose labels drive the contrast-phase simulator exactly like a real
TotalSegmentator label map would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctray.data.nifti import Volume
from ctray.data.organs import TS_LABELS

__all__ = ["NATIVE_HU", "PhantomConfig", "make_phantom"]

# Native attenuation (HU) of the phantom's tissues; organ values follow the DESIGN table.
NATIVE_HU: dict[str, float] = {
    "air": -1000.0,
    "fat": -100.0,
    "visceral_fat": -90.0,
    "muscle": 50.0,
    "cortical_bone": 650.0,
    "cancellous_bone": 250.0,
    "disc": 90.0,
    "csf": 15.0,
    "spinal_cord": 30.0,
    "liver": 55.0,
    "spleen": 45.0,
    "kidney": 30.0,
    "pancreas": 40.0,
    "aorta": 40.0,
    "ivc": 40.0,
    "portal_vein": 40.0,
    "gallbladder": 10.0,
    "bowel": 25.0,
    "gas": -950.0,
}


@dataclass(frozen=True, kw_only=True)
class PhantomConfig:
    """Grid of the phantom (voxels along i, j, k = R, A, S; spacing in mm)."""

    shape: tuple[int, int, int] = (96, 80, 48)
    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)
    noise_sd: float = 10.0

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 4:
            raise ValueError(f"PhantomConfig.shape must be 3 ints >= 4, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"PhantomConfig.spacing must be 3 positive mm, got {self.spacing}")


class _Canvas:
    """Coordinate grid (mm, centred, RAS) plus the HU and label arrays being painted."""

    def __init__(self, config: PhantomConfig) -> None:
        shape = config.shape
        sp = np.asarray(config.spacing, dtype=np.float64)
        self.half = (np.asarray(shape) - 1) * sp / 2.0
        axes = [
            np.arange(n, dtype=np.float32) * s - h
            for n, s, h in zip(shape, sp, self.half, strict=True)
        ]
        self.x = axes[0][:, None, None]
        self.y = axes[1][None, :, None]
        self.z = axes[2][None, None, :]
        self.hu = np.full(shape, NATIVE_HU["air"], dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.shape = shape

    def paint(self, mask: np.ndarray, tissue: str | float, label: int | None = None) -> None:
        mask = np.broadcast_to(mask, self.shape)
        self.hu[mask] = NATIVE_HU[tissue] if isinstance(tissue, str) else tissue
        if label is not None:
            self.labels[mask] = label

    def ellipse_xy(self, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
        """Elliptic cylinder along z (broadcasts to (nx, ny, 1))."""
        return ((self.x - cx) / ax) ** 2 + ((self.y - cy) / ay) ** 2 <= 1.0

    def tube(
        self,
        cx: np.ndarray | float,
        cy: np.ndarray | float,
        rx: np.ndarray | float,
        ry: np.ndarray | float,
        zmask: np.ndarray,
    ) -> np.ndarray:
        """Tube whose centre and radii may vary per slice (scalars or arrays of shape (nz,))."""
        nz = self.shape[2]
        cx, cy, rx, ry = (
            np.broadcast_to(np.asarray(a, dtype=np.float32), (nz,))[None, None, :]
            for a in (cx, cy, rx, ry)
        )
        inside = ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0
        return inside & zmask[None, None, :]

    def ellipsoid(self, centre: np.ndarray, radii: np.ndarray, rot: np.ndarray) -> np.ndarray:
        """Rotated ellipsoid; `rot` maps world offsets to the ellipsoid's own axes."""
        dx, dy, dz = self.x - centre[0], self.y - centre[1], self.z - centre[2]
        acc = None
        for row, r in zip(rot, radii, strict=True):
            u = (row[0] * dx + row[1] * dy + row[2] * dz) / r
            acc = u * u if acc is None else acc + u * u
        return acc <= 1.0

    def capsule(self, p0: np.ndarray, p1: np.ndarray, radius: float) -> np.ndarray:
        """Points within `radius` of the segment p0-p1 (a tube with rounded ends)."""
        d = np.asarray(p1, dtype=np.float64) - p0
        dd = float(d @ d) or 1e-9
        dx, dy, dz = self.x - p0[0], self.y - p0[1], self.z - p0[2]
        t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / dd, 0.0, 1.0)
        ex, ey, ez = dx - t * d[0], dy - t * d[1], dz - t * d[2]
        return ex * ex + ey * ey + ez * ez <= radius * radius


def _rotation(rng: np.random.Generator, max_deg: tuple[float, float, float]) -> np.ndarray:
    a, b, c = np.deg2rad([rng.uniform(-m, m) for m in max_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(config: PhantomConfig) -> np.ndarray:
    """RAS affine with the volume centre at world (0, 0, 0)."""
    sp = np.asarray(config.spacing, dtype=np.float64)
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = -(np.asarray(config.shape) - 1) * sp / 2.0
    return aff


def make_phantom(
    seed: int, *, config: PhantomConfig = PhantomConfig()
) -> tuple[Volume, np.ndarray]:
    """Generate a native abdominal CT (HU, float32) and its uint8 TotalSegmentator label map.

    Sizes and positions are relative to the grid, so tiny test grids still contain every organ;
    the same seed always gives identical arrays.

    Args:
        seed: seed for `np.random.default_rng`.
        config: grid shape and spacing.
    """
    rng = np.random.default_rng(seed)
    cv = _Canvas(config)
    hx, hy, hz = (float(h) for h in cv.half)
    u = rng.uniform
    nz = config.shape[2]
    zs = cv.z.ravel().astype(np.float64)
    w = zs / max(hz, 1e-6)  # -1 (inferior) .. +1 (superior)
    all_z = np.ones(nz, dtype=bool)

    # Body outline, subcutaneous fat, muscle wall and the visceral cavity.
    ax, ay = u(0.78, 0.9) * hx, u(0.62, 0.74) * hy
    bx, by = u(-0.03, 0.03) * hx, u(-0.05, 0.05) * hy
    fat, wall = u(0.06, 0.12), u(0.04, 0.06)
    cv.paint(cv.ellipse_xy(bx, by, ax, ay), "fat")
    inner = cv.ellipse_xy(bx, by, ax * (1 - fat), ay * (1 - fat))
    cv.paint(inner, "muscle")
    cavity = cv.ellipse_xy(bx, by, ax * (1 - fat - wall), ay * (1 - fat - wall))
    cv.paint(cavity, "visceral_fat")

    # Spine geometry (painted last so nothing overwrites bone).
    sx, sy = bx + u(-0.02, 0.02) * ax, by - u(0.3, 0.4) * ay
    rs = u(0.13, 0.16) * ay
    rc = 0.45 * rs
    canal_y = sy - rs - rc - 0.05 * rs

    # Muscles: iliopsoas (wider inferiorly) and autochthon, inside the body wall.
    grow = 0.7 + 0.3 * (1 - w)
    for side, label in ((1.0, TS_LABELS["iliopsoas_left"]), (-1.0, TS_LABELS["iliopsoas_right"])):
        cxp = sx + side * (1.25 * rs + 0.07 * ax * grow)
        psoas = cv.tube(cxp, np.full(nz, sy + 0.1 * rs), 0.07 * ax * grow, 0.1 * ay * grow, all_z)
        cv.paint(psoas & cavity, "muscle", label)
    for side, label in ((1.0, TS_LABELS["autochthon_left"]), (-1.0, TS_LABELS["autochthon_right"])):
        cxa = sx + side * u(0.13, 0.17) * ax
        auto = cv.ellipse_xy(cxa, canal_y - 0.1 * ay, 0.1 * ax, 0.15 * ay)
        cv.paint(auto & inner, "muscle", label)

    # Bowel (drawn before the solid organs, which displace it): colon frame + small-bowel loops.
    def gut(mask: np.ndarray, centre_y: float, radius: float, label: int) -> None:
        mask = mask & cavity
        cv.paint(mask, "bowel", label)
        gas_top = centre_y + radius * (1 - 2 * u(0.2, 0.6))  # gas rises anteriorly (+y)
        cv.paint(mask & (cv.y > gas_top), u(-1000.0, -900.0), label)

    rcol = u(0.1, 0.14) * ay
    zc_lo, zc_hi = -0.9 * hz, u(0.1, 0.4) * hz
    colon_y = by + u(0.0, 0.2) * ay
    for side in (-1.0, 1.0):  # ascending (right, -x) and descending (left, +x) colon
        cxc = bx + side * u(0.6, 0.7) * ax
        seg = cv.capsule(np.array([cxc, colon_y, zc_lo]), np.array([cxc, colon_y, zc_hi]), rcol)
        gut(seg, colon_y, rcol, TS_LABELS["colon"])
    ty = by + u(0.45, 0.6) * ay
    trans = cv.capsule(
        np.array([bx - 0.6 * ax, ty, zc_hi]), np.array([bx + 0.6 * ax, ty, zc_hi]), rcol
    )
    gut(trans, ty, rcol, TS_LABELS["colon"])
    for _ in range(int(rng.integers(6, 11))):
        c = np.array([bx + u(-0.45, 0.45) * ax, by + u(0.1, 0.6) * ay, u(-0.85, 0.0) * hz])
        r = u(0.08, 0.13) * ay
        gut(
            cv.ellipsoid(c, np.array([r, r, r * 1.5]), _rotation(rng, (30, 30, 90))),
            c[1],
            r,
            TS_LABELS["small_bowel"],
        )

    # Solid organs.
    liver_c = np.array([bx - u(0.35, 0.5) * ax, by + u(0.0, 0.15) * ay, u(0.25, 0.45) * hz])
    liver_r = np.array([u(0.38, 0.48) * ax, u(0.5, 0.65) * ay, u(0.5, 0.7) * hz])
    cv.paint(
        cv.ellipsoid(liver_c, liver_r, _rotation(rng, (8, 8, 15))) & cavity,
        "liver",
        TS_LABELS["liver"],
    )
    gb_c = liver_c + np.array([0.45, 0.55, -0.55]) * liver_r
    gb_r = np.array([0.07 * ax, 0.1 * ay, 0.2 * hz])
    cv.paint(
        cv.ellipsoid(gb_c, gb_r, _rotation(rng, (10, 10, 30))) & cavity,
        "gallbladder",
        TS_LABELS["gallbladder"],
    )
    spleen_c = np.array([bx + u(0.55, 0.65) * ax, by - u(0.05, 0.2) * ay, u(0.2, 0.45) * hz])
    spleen_r = np.array([u(0.14, 0.18) * ax, u(0.25, 0.32) * ay, u(0.3, 0.4) * hz])
    cv.paint(
        cv.ellipsoid(spleen_c, spleen_r, _rotation(rng, (10, 10, 25))) & cavity,
        "spleen",
        TS_LABELS["spleen"],
    )
    kz = u(-0.2, 0.15) * hz
    for side, label in ((1.0, TS_LABELS["kidney_left"]), (-1.0, TS_LABELS["kidney_right"])):
        kc = np.array(
            [
                sx + side * u(0.34, 0.42) * ax,
                sy + u(-0.05, 0.1) * ay,
                kz - (u(0.05, 0.15) * hz if side < 0 else 0.0),
            ]
        )
        kr = np.array([u(0.15, 0.19) * ax, u(0.16, 0.2) * ay, u(0.45, 0.6) * hz])
        cv.paint(cv.ellipsoid(kc, kr, _rotation(rng, (10, 15, 20))) & cavity, "kidney", label)

    # Great vessels along z, splitting into iliac vessels below the bifurcation.
    ra = u(0.09, 0.12) * ay
    xa = sx + u(0.06, 0.12) * ax + u(-0.03, 0.03) * ax * w
    ya = np.full(nz, sy + rs + ra + 0.03 * ay)
    z_bif = u(-0.75, -0.45) * hz
    spread = u(0.35, 0.55) * np.clip(z_bif - zs, 0.0, None)  # lateral drift of iliacs (mm)
    above = zs >= z_bif
    ri = u(0.09, 0.12) * ay
    xi = xa - u(0.2, 0.26) * ax
    yi = ya + u(0.0, 0.06) * ay
    r_il = np.full(nz, 0.65 * ra)
    for side, art, vein in (
        (1.0, "iliac_artery_left", "iliac_vena_left"),
        (-1.0, "iliac_artery_right", "iliac_vena_right"),
    ):
        cxv = (xa + xi) / 2 + side * (spread + 0.5 * ri)
        cv.paint(
            cv.tube(cxv, yi - 0.5 * ri, 0.8 * ri, 0.6 * ri, ~above) & cavity, "ivc", TS_LABELS[vein]
        )
        cv.paint(
            cv.tube(xa + side * spread, ya, r_il, r_il, ~above) & cavity, "aorta", TS_LABELS[art]
        )
    cv.paint(
        cv.tube(xi, yi, np.full(nz, 1.2 * ri), np.full(nz, 0.8 * ri), above) & cavity,
        "ivc",
        TS_LABELS["inferior_vena_cava"],
    )
    cv.paint(
        cv.tube(xa, ya, np.full(nz, ra), np.full(nz, ra), above) & cavity,
        "aorta",
        TS_LABELS["aorta"],
    )

    # Pancreas in front of the aorta, splenic/portal vein along it into the liver hilum.
    zp = u(-0.05, 0.15) * hz
    i_mid = nz // 2
    head = np.array([xa[i_mid] - u(0.12, 0.2) * ax, ya[i_mid] + u(0.25, 0.35) * ay, zp])
    tail = np.array(
        [spleen_c[0] - 0.8 * spleen_r[0], ya[i_mid] + u(0.0, 0.1) * ay, zp + u(0.05, 0.2) * hz]
    )
    cv.paint(cv.capsule(head, tail, u(0.1, 0.13) * ay) & cavity, "pancreas", TS_LABELS["pancreas"])
    rv = u(0.06, 0.08) * ay
    confluence = head + np.array([0.05 * ax, -0.06 * ay, 0.02 * hz])
    hilum = liver_c + np.array([0.35, -0.1, -0.2]) * liver_r
    pv = TS_LABELS["portal_vein_and_splenic_vein"]
    cv.paint(
        cv.capsule(tail - np.array([0, 0.06 * ay, 0]), confluence, 0.8 * rv) & cavity,
        "portal_vein",
        pv,
    )
    cv.paint(cv.capsule(confluence, hilum, rv) & cavity, "portal_vein", pv)

    # Spine: vertebral bodies (cortex + cancellous), discs, canal with cord, posterior arch.
    period = u(30.0, 36.0)
    disc_mm = u(6.0, 9.0)
    phase = (zs - zs[0] + u(0.0, period)) % period
    disc = phase < disc_mm
    level = np.floor((zs - zs[0] + u(0.0, period)) / period).astype(int)
    level_ids = np.clip(
        TS_LABELS["vertebrae_L5"] + int(rng.integers(0, 3)) + level,
        TS_LABELS["vertebrae_L5"],
        TS_LABELS["vertebrae_T11"],
    ).astype(np.uint8)
    vid = level_ids[None, None, :]
    bone_z = ~disc[None, None, :]
    body_out = cv.ellipse_xy(sx, sy, 1.15 * rs, rs)
    body_in = cv.ellipse_xy(sx, sy, 1.15 * rs - 0.25 * rs, 0.75 * rs)
    cv.paint(body_out & disc[None, None, :], "disc", 0)
    arch = cv.ellipse_xy(sx, canal_y, 1.9 * rc, 1.9 * rc) & (cv.y <= canal_y + 0.5 * rc)
    spinous = (np.abs(cv.x - sx) < 0.25 * rc) & (cv.y < canal_y) & (cv.y > canal_y - 4.5 * rc)
    bone = ((body_out | arch | spinous) & inner) & bone_z
    cv.paint(bone, "cortical_bone")
    cv.labels[bone] = np.broadcast_to(vid, cv.shape)[bone]
    cv.paint(body_in & bone_z, "cancellous_bone")
    canal = cv.ellipse_xy(sx, canal_y, rc, rc)
    cv.paint(canal, "csf", 0)
    cv.paint(
        cv.ellipse_xy(sx, canal_y, 0.55 * rc, 0.55 * rc), "spinal_cord", TS_LABELS["spinal_cord"]
    )

    hu = cv.hu
    if config.noise_sd > 0:
        hu += rng.standard_normal(cv.shape, dtype=np.float32) * np.float32(config.noise_sd)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return Volume(array=hu, affine=_affine(config)), cv.labels
