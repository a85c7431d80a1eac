"""Contrast-phase vocabulary and an organ-wise contrast-enhancement simulator.

Real multi-phase CT cannot ship with the project, so phases are simulated from a native scan and
its organ labels, with known per-organ truth. "Semi-paired" output mimics real acquisitions
(seed 000): each phase is slightly moved, covers different slices and has its own noise level,
while the voxel-aligned truth is kept for evaluation only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ctray.data.nifti import Volume
from ctray.data.organs import ENHANCING_ORGANS, ORGANS, TS_LABELS

__all__ = [
    "ENHANCEMENT_HU",
    "NATIVE_INDEX",
    "PHASES",
    "SimulatedPhase",
    "SimulatorConfig",
    "parse_phase",
    "phase_name",
    "simulate_phases",
]

# Index order is the customer's seed: 0 arterial, 1 venous, 2 delayed, 3 non-contrast.
PHASES: tuple[str, ...] = ("arterial", "venous", "delayed", "native")
NATIVE_INDEX = 3
FILL_HU = -1024.0  # outside a phase's z-coverage
MOTION_CVAL_HU = -1000.0  # air enters the field of view when the patient moves

_ALIASES: dict[str, int] = {
    **{a: 0 for a in ("arterial", "art", "a", "late-arterial", "arterial-phase")},
    **{
        a: 1
        for a in (
            "venous",
            "ven",
            "v",
            "portal-venous",
            "portalvenous",
            "pv",
            "portal",
            "venous-phase",
            "portal-venous-phase",
        )
    },
    **{a: 2 for a in ("delayed", "delay", "d", "late", "excretory", "equilibrium")},
    **{
        a: 3
        for a in (
            "native",
            "non-contrast",
            "noncontrast",
            "nc",
            "unenhanced",
            "plain",
            "pre-contrast",
            "precontrast",
            "n",
        )
    },
}
_UNKNOWN = "unknown phase {!r}; valid: arterial, venous, delayed, native (non-contrast), or 0-3"


def parse_phase(value: str | int) -> int:
    """Phase index from a name, alias, digit string or int (case-insensitive).

    Raises:
        ValueError: for anything else, listing the valid phases.
    """
    if isinstance(value, bool):
        raise ValueError(_UNKNOWN.format(value))
    if isinstance(value, int | np.integer):
        if 0 <= int(value) < len(PHASES):
            return int(value)
        raise ValueError(_UNKNOWN.format(value))
    if isinstance(value, str):
        key = value.strip().lower().replace("_", "-").replace(" ", "-")
        if key.isdigit() and 0 <= int(key) < len(PHASES):
            return int(key)
        if key in _ALIASES:
            return _ALIASES[key]
    raise ValueError(_UNKNOWN.format(value))


def phase_name(index: int) -> str:
    """Canonical name of a phase index (0-3)."""
    return PHASES[parse_phase(int(index))]


def _const(v: float) -> tuple[float, float]:
    return (v, v)


# organ -> phase -> (low, high) mean attenuation in HU (DESIGN table; literature values).
ENHANCEMENT_HU: dict[str, dict[str, tuple[float, float]]] = {
    "aorta": {
        "native": _const(40),
        "arterial": (300, 350),
        "venous": (150, 180),
        "delayed": (100, 120),
    },
    "portal_vein": {
        "native": _const(40),
        "arterial": (120, 150),
        "venous": (180, 200),
        "delayed": (100, 120),
    },
    "ivc": {
        "native": _const(40),
        "arterial": (60, 100),
        "venous": (130, 160),
        "delayed": (100, 120),
    },
    "liver": {
        "native": _const(55),
        "arterial": (70, 80),
        "venous": (110, 120),
        "delayed": (80, 90),
    },
    "spleen": {
        "native": _const(45),
        "arterial": _const(120),
        "venous": _const(120),
        "delayed": _const(90),
    },
    "kidney": {
        "native": _const(30),
        "arterial": _const(180),
        "venous": _const(170),
        "delayed": _const(120),
    },
    "pancreas": {
        "native": _const(40),
        "arterial": _const(120),
        "venous": _const(100),
        "delayed": _const(70),
    },
}
assert set(ENHANCEMENT_HU) == set(ENHANCING_ORGANS)


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """Knobs of the phase simulator.

    Args:
        subject_variation: per-subject multiplicative variation of enhancement (about ±20%).
        max_rotation_deg: semi-paired rigid misalignment, per axis.
        max_translation_mm: semi-paired translation, per axis.
        noise_sd_range: per-phase Gaussian noise sd (HU) is drawn from this range.
        min_z_coverage: minimum fraction of slices each phase covers.
        semi_paired: False gives observed == truth with full coverage (paired data).
        spleen_arterial_heterogeneity_hu: amplitude of the arciform spleen pattern (arterial).
        collecting_system_hu: extra HU range of the excreted contrast in the kidney core
            (delayed); 0 disables it.
        collecting_system_fraction: share of the deepest kidney voxels that are collecting system.
        psf_sigma_voxels: Gaussian blur (sd in voxels) of the enhancement added to a scan: the
            scanner images contrast through the same point-spread function as the rest of the
            scan, so enhanced organs get edges as soft as every other edge in it, not the hard
            steps of a label map (0: hard steps). Hard steps are also what makes simulated
            motion and its registration leave large interpolation differences at edges.
        motion_order: spline order of the resampling that moves the patient (3: cubic, which
            keeps edges nearly as sharp as a real acquisition; 1, linear, visibly blurs them,
            so observed phases would be blurrier than the scans a model meets in use).
    """

    subject_variation: float = 0.2
    max_rotation_deg: float = 3.0
    max_translation_mm: float = 4.0
    noise_sd_range: tuple[float, float] = (5.0, 20.0)
    min_z_coverage: float = 0.8
    semi_paired: bool = True
    spleen_arterial_heterogeneity_hu: float = 25.0
    collecting_system_hu: tuple[float, float] = (300.0, 600.0)
    collecting_system_fraction: float = 0.1
    psf_sigma_voxels: float = 0.0
    motion_order: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.subject_variation < 1:
            raise ValueError("subject_variation must be in [0, 1)")
        if not 0 < self.min_z_coverage <= 1:
            raise ValueError("min_z_coverage must be in (0, 1]")
        lo, hi = self.noise_sd_range
        if not 0 <= lo <= hi:
            raise ValueError("noise_sd_range must satisfy 0 <= low <= high")
        if self.psf_sigma_voxels < 0:
            raise ValueError("psf_sigma_voxels must be >= 0")


@dataclass(frozen=True, kw_only=True, eq=False)
class SimulatedPhase:
    """One simulated phase: aligned truth (evaluation only) and the observed, semi-paired scan.

    ``motion`` is the simulated patient motion as a 4x4 matrix on voxel indices: the observed
    voxel ``o`` shows the truth at ``motion @ [*o, 1]`` (identity for paired data). It is known
    only because the phase is simulated; registration is scored against it.
    """

    phase: int
    truth: np.ndarray
    observed: np.ndarray
    z_range: tuple[int, int]
    motion: np.ndarray = field(default_factory=lambda: np.eye(4))


def _native_hu(organ: str) -> float:
    return ENHANCEMENT_HU[organ]["native"][0]


def _subject_factors(seed: int, v: float) -> dict[str, float]:
    """Per-subject, per-organ enhancement factors shared by all phases of one subject."""
    rng = np.random.default_rng([seed, 0])
    return {organ: float(rng.uniform(1 - v, 1 + v)) for organ in ENHANCING_ORGANS}


def _enhance(
    native: np.ndarray,
    labels: np.ndarray,
    phase: str,
    factors: dict[str, float],
    rng: np.random.Generator,
    config: SimulatorConfig,
) -> np.ndarray:
    truth = native.astype(np.float32, copy=True)
    v = config.subject_variation
    for organ in ENHANCING_ORGANS:
        mask = np.isin(labels, ORGANS[organ])
        lo, hi = ENHANCEMENT_HU[organ][phase]
        target = float(np.clip(rng.uniform(lo, hi) * factors[organ], lo * (1 - v), hi * (1 + v)))
        if not mask.any():
            continue
        truth[mask] += np.float32(target - _native_hu(organ))
        if organ == "spleen" and phase == "arterial" and config.spleen_arterial_heterogeneity_hu:
            pattern = _arciform(mask, rng, config.spleen_arterial_heterogeneity_hu)[mask]
            truth[mask] += pattern - pattern.mean()  # heterogeneous, organ mean unchanged
        if organ == "kidney" and phase == "delayed" and config.collecting_system_hu[1] > 0:
            core = _kidney_core(labels, config.collecting_system_fraction)
            truth[core] += np.float32(rng.uniform(*config.collecting_system_hu))
    if config.psf_sigma_voxels > 0:
        added = ndimage.gaussian_filter(truth - native, config.psf_sigma_voxels)
        truth = (native + added).astype(np.float32)
    return truth


def _arciform(mask: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Zero-mean banded pattern (the heterogeneous 'zebra' spleen of the arterial phase)."""
    idx = np.indices(mask.shape, dtype=np.float32)
    k = rng.normal(size=3)
    k *= rng.uniform(0.4, 0.9) / np.linalg.norm(k)
    arg = sum(ki * ii for ki, ii in zip(k, idx, strict=True))
    return (amplitude * np.sin(arg + rng.uniform(0, 2 * np.pi))).astype(np.float32)


def _kidney_core(labels: np.ndarray, fraction: float) -> np.ndarray:
    """Deepest `fraction` of each kidney's voxels (stands in for the collecting system)."""
    core = np.zeros(labels.shape, dtype=bool)
    for lab in (TS_LABELS["kidney_right"], TS_LABELS["kidney_left"]):
        mask = labels == lab
        if mask.sum() < 8 or fraction <= 0:
            continue
        depth = ndimage.distance_transform_edt(mask)
        cut = np.quantile(depth[mask], 1 - fraction)
        core |= mask & (depth >= cut) & (depth > 1)
    return core


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _observe(
    truth: np.ndarray,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    config: SimulatorConfig,
) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """Rigid motion about the volume centre (in mm), partial z-coverage and noise.

    Returns the observed volume, its z-coverage and the motion (4x4, observed voxel -> truth).
    """
    rot = _rotation(np.deg2rad(rng.uniform(-1, 1, 3) * config.max_rotation_deg))
    shift_mm = rng.uniform(-1, 1, 3) * config.max_translation_mm
    s = np.asarray(spacing, dtype=np.float64)
    matrix = (rot * s[None, :]) / s[:, None]  # S^-1 R S: voxel -> voxel
    centre = (np.asarray(truth.shape, dtype=np.float64) - 1) / 2
    offset = centre - matrix @ centre + shift_mm / s
    moved = ndimage.affine_transform(
        truth,
        matrix,
        offset=offset,
        order=config.motion_order,
        mode="constant",
        cval=MOTION_CVAL_HU,
        output=np.float32,
    )
    nz = truth.shape[2]
    min_len = min(nz, max(1, math.ceil(config.min_z_coverage * nz)))
    length = int(rng.integers(min_len, nz + 1))
    start = int(rng.integers(0, nz - length + 1))
    sd = float(rng.uniform(*config.noise_sd_range))
    moved += rng.standard_normal(moved.shape, dtype=np.float32) * np.float32(sd)
    moved[:, :, :start] = FILL_HU
    moved[:, :, start + length :] = FILL_HU
    motion = np.eye(4)
    motion[:3, :3], motion[:3, 3] = matrix, offset
    return moved, (start, start + length), motion


def simulate_phases(
    native: Volume,
    labels: np.ndarray,
    *,
    seed: int,
    phases: Sequence[int | str] = PHASES,
    config: SimulatorConfig = SimulatorConfig(),
) -> dict[int, SimulatedPhase]:
    """Simulate contrast phases of one subject from a native CT and its TotalSegmentator labels.

    Each enhancing organ gets a per-subject target mean (table range times a subject factor);
    the difference to the table's native value is added to every voxel of the organ, so real
    scans keep their own texture and baseline. Labels outside ORGANS are left unchanged.

    Args:
        native: native (non-contrast) CT in HU, ideally canonical RAS (z = third voxel axis).
        labels: integer label map on the same grid (TotalSegmentator v2 `total` ids).
        seed: subject seed; each phase uses its own derived stream, so results do not depend
            on which other phases are requested.
        phases: names or indices of the phases to simulate.
        config: simulator settings.

    Returns:
        Mapping phase index -> SimulatedPhase.
    """
    labels = np.asarray(labels)
    if labels.shape != native.shape:
        raise ValueError(f"labels shape {labels.shape} != native shape {native.shape}")
    factors = _subject_factors(seed, config.subject_variation)
    base = np.asarray(native.array, dtype=np.float32)
    out: dict[int, SimulatedPhase] = {}
    for p in phases:
        idx = parse_phase(p)
        rng = np.random.default_rng([seed, 1, idx])
        if idx == NATIVE_INDEX:
            truth = base.copy()
        else:
            truth = _enhance(base, labels, PHASES[idx], factors, rng, config)
        motion = np.eye(4)
        if config.semi_paired:
            observed, z_range, motion = _observe(truth, native.spacing, rng, config)
        else:
            observed, z_range = truth.copy(), (0, truth.shape[2])
        out[idx] = SimulatedPhase(
            phase=idx, truth=truth, observed=observed, z_range=z_range, motion=motion
        )
    return out
