"""Shards for the phase GAN: (source phase, target phase) patch pairs from three kinds of input.

* the built-in phantom (``phantom``: N demo subjects, phases simulated);
* native scans ``NAME.nii.gz`` with TotalSegmentator labels ``NAME_seg.nii.gz`` (phases
  simulated; a scan without labels is skipped with that reason, never guessed at);
* real multi-phase studies: one folder per patient, one file per phase named by phase.

Training rows carry the semi-paired observed volumes (different noise and z-coverage), with
the target phase rigidly registered onto the source phase's grid (``register``, on by default):
a voxel-wise loss against a target a few millimetres off rewards blurring or doing nothing.
Only the observed volumes are used for that; the registration error against the simulated
motion is recorded in the manifest (``extra.registration_mm``). Validation rows pair a noisy
input aligned with the noise-free truth of the target phase, so validation measures
translation (and denoising), not registration error. Real studies have no aligned truth: their
`truth` is the observed target (registered onto the source in training rows).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ctray.config import from_dict, to_dict
from ctray.data.build import (
    BuildConfig,
    Row,
    SubjectSource,
    build_shards,
    crop,
    hu_stats,
    pad_to,
    phantom_sources,
    prepare,
    sample_origins,
)
from ctray.data.nifti import (
    NIFTI_SUFFIXES,
    HUWindow,
    NiftiError,
    Volume,
    canonical_ras,
    is_nifti,
    load_nifti,
    resample_like,
)
from ctray.data.organs import organ_mask
from ctray.data.phantom import make_phantom
from ctray.data.phases import FILL_HU, PHASES, SimulatorConfig, parse_phase, simulate_phases
from ctray.data.registration import displacement_mm, resample, rigid_register
from ctray.data.shards import Manifest
from ctray.data.volumes import (
    VOLUME_FORMATS,
    is_volume,
    load_volume,
    volume_checksum,
    volume_stem,
)
from ctray.metrics import LABEL_CLASSES

PHANTOM_VERSION = "phantom-v2"  # v2: registered targets, PSF
AIR_HU = -1000.0
BODY_HU = -500.0


@dataclass(frozen=True, kw_only=True)
class PhaseGANDataOptions:
    """Family-specific build options.

    Attributes:
        source_phases / target_phases: phases (names or indices) to draw pairs from.
        pairs_per_patch: ordered (source, target) pairs drawn per patch position.
        simulations: independent phase simulations per native scan (different enhancement,
            motion and noise draws); with one real scan, use >= 2 to get a validation subject.
        semi_paired: simulate misalignment/noise/z-coverage (off: perfectly paired phases).
        register: rigidly register each training target onto its source's grid.
        psf_sigma_voxels: scanner point-spread function (Gaussian sd, voxels) of the simulated
            enhancement (SimulatorConfig.psf_sigma_voxels) and of the phantom, which is drawn
            as an ideal object with hard voxel edges (a real scan already has its PSF).
    """

    source_phases: tuple[str, ...] = PHASES
    target_phases: tuple[str, ...] = PHASES
    pairs_per_patch: int = 3
    simulations: int = 1
    semi_paired: bool = True
    register: bool = True
    psf_sigma_voxels: float = 0.7

    def pairs(self) -> list[tuple[int, int]]:
        src = sorted({parse_phase(p) for p in self.source_phases})
        tgt = sorted({parse_phase(p) for p in self.target_phases})
        pairs = [(s, t) for s, t in itertools.product(src, tgt) if s != t]
        if not pairs:
            raise ValueError("source and target phases leave no pair with different phases")
        return pairs


def coarse_labels(ts_labels: np.ndarray | None, native_hu: np.ndarray) -> np.ndarray:
    """Body mask (HU > -500) plus the organ classes used by the ROI metrics, as uint8."""
    out = (native_hu > BODY_HU).astype(np.uint8) * LABEL_CLASSES["body"]
    if ts_labels is not None:
        for organ, cls in LABEL_CLASSES.items():
            if organ != "body":
                out[organ_mask(ts_labels, organ)] = cls
    return out


@dataclass(kw_only=True, eq=False)
class _Phases:
    """A subject on the build grid: observed and aligned volumes per phase, labels."""

    observed: dict[int, np.ndarray]
    truth: dict[int, np.ndarray]
    val_inputs: dict[int, np.ndarray]
    z_ranges: dict[int, tuple[int, int]]
    labels: np.ndarray
    volume: Volume
    # Simulated motion per phase (observed voxel -> truth voxel); None for real studies.
    motions: dict[int, np.ndarray] | None = None


def _simulated(
    native: Volume, ts_labels: np.ndarray, *, seed: int, opts: PhaseGANDataOptions
) -> _Phases:
    sim_config = SimulatorConfig(
        semi_paired=opts.semi_paired, psf_sigma_voxels=opts.psf_sigma_voxels
    )
    sim = simulate_phases(native, ts_labels, seed=seed, config=sim_config)
    rng = np.random.default_rng([seed, 99])
    lo, hi = sim_config.noise_sd_range
    return _Phases(
        observed={p: s.observed for p, s in sim.items()},
        truth={p: s.truth for p, s in sim.items()},
        # Validation inputs: aligned with the truth, but with scanner noise like real inputs.
        val_inputs={
            p: (s.truth + rng.normal(0.0, rng.uniform(lo, hi), s.truth.shape)).astype(np.float32)
            for p, s in sim.items()
        },
        z_ranges={p: s.z_range for p, s in sim.items()},
        labels=coarse_labels(ts_labels, native.array),
        volume=native,
        motions={p: s.motion for p, s in sim.items()},
    )


def _coverage(shape: tuple[int, ...], z_range: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[:, :, z_range[0] : z_range[1]] = True
    return mask


def _covered_slices(
    transform: np.ndarray,
    shape: tuple[int, ...],
    target_z: tuple[int, int],
    source_z: tuple[int, int],
) -> np.ndarray:
    """Source slices whose every voxel maps inside the target's z-coverage (bool per slice).

    The target z of a voxel is affine in (i, j), so its extremes over a slice are at corners;
    in-plane, outside the field of view is air, not missing data.
    """
    nx, ny, nz = shape[:3]
    corners = np.array([[i, j] for i in (0, nx - 1) for j in (0, ny - 1)], dtype=np.float64)
    k = np.arange(nz, dtype=np.float64)
    z = (corners @ transform[2, :2])[None, :] + (k * transform[2, 2] + transform[2, 3])[:, None]
    # Cubic interpolation reads two slices either side of the sampled position.
    inside = (z.min(1) >= target_z[0] + 1) & (z.max(1) <= target_z[1] - 2)
    return inside & (k >= source_z[0]) & (k < source_z[1])


@dataclass(kw_only=True, eq=False)
class _Registered:
    """Targets on their sources' grids, the slices where they are valid, the errors in mm."""

    targets: dict[tuple[int, int], np.ndarray]
    z_range: tuple[int, int]
    error_mm: dict[str, float]
    motion_mm: dict[str, float]


def _register(
    data: _Phases, pairs: list[tuple[int, int]], spacing: tuple[float, ...]
) -> _Registered:
    """Register every phase of the pairs onto one reference phase and compose per pair.

    With ``A_p`` mapping reference voxels into phase ``p``, the target ``t`` seen on the grid of
    the source ``s`` is sampled at ``A_t @ inv(A_s)``: one registration per phase, not per pair.
    """
    phases = sorted({p for pair in pairs for p in pair})
    ref = min(s for s, _ in pairs)
    shape = data.observed[ref].shape
    cover = {p: _coverage(data.observed[p].shape, data.z_ranges[p]) for p in phases}
    to_phase = {ref: np.eye(4)}
    for p in phases:
        if p != ref:
            to_phase[p] = rigid_register(
                data.observed[ref],
                data.observed[p],
                spacing,
                fixed_mask=cover[ref],
                moving_mask=cover[p],
                seed=p,
            )
    targets, error, motion = {}, {}, {}
    lo, hi = max(r[0] for r in data.z_ranges.values()), min(r[1] for r in data.z_ranges.values())
    for s, t in pairs:
        m = to_phase[t] @ np.linalg.inv(to_phase[s])
        targets[(s, t)] = resample(data.observed[t], m, shape, order=3, cval=FILL_HU)
        slices = np.flatnonzero(_covered_slices(m, shape, data.z_ranges[t], data.z_ranges[s]))
        lo, hi = (max(lo, slices[0]), min(hi, slices[-1] + 1)) if len(slices) else (0, 0)
        if data.motions is not None:
            # Truth of the target at the source voxel u: motion_t^-1 @ motion_s @ u.
            true = np.linalg.inv(data.motions[t]) @ data.motions[s]
            body = data.observed[s] > BODY_HU
            key = f"{PHASES[s]}->{PHASES[t]}"
            error[key] = round(displacement_mm(m, true, body, spacing), 3)
            motion[key] = round(displacement_mm(np.eye(4), true, body, spacing), 3)
    return _Registered(
        targets=targets, z_range=(int(lo), int(hi)), error_mm=error, motion_mm=motion
    )


def _rows(
    subject: str,
    data: _Phases,
    *,
    split: str,
    rng: np.random.Generator,
    config: BuildConfig,
    opts: PhaseGANDataOptions,
) -> tuple[list[Row], dict[str, Any]]:
    window = HUWindow(lo=config.window_lo, hi=config.window_hi)
    patch = config.patch_size
    pairs = [(s, t) for s, t in opts.pairs() if s in data.truth and t in data.truth]
    if not pairs:
        raise ValueError(f"{subject}: none of the requested phase pairs is present")

    def norm(a: np.ndarray) -> np.ndarray:
        return pad_to(window.normalise(a).astype(np.float32), patch, 0.0)

    obs = {p: norm(a) for p, a in data.observed.items()}
    truth = {p: norm(a) for p, a in data.truth.items()}
    inputs = obs if split == "train" else {p: norm(a) for p, a in data.val_inputs.items()}
    labels = pad_to(data.labels, patch, 0)
    starts = [r[0] for r in data.z_ranges.values()]
    stops = [r[1] for r in data.z_ranges.values()]
    z_range = (max(starts), min(stops))
    extra: dict[str, Any] = {}
    registered: dict[tuple[int, int], np.ndarray] = {}
    if split == "train" and opts.register:
        reg = _register(data, pairs, tuple(data.volume.spacing))
        registered = {pair: norm(a) for pair, a in reg.targets.items()}
        if reg.z_range[1] - reg.z_range[0] >= patch[2]:
            z_range = reg.z_range
        if reg.error_mm:
            extra["registration_mm"] = reg.error_mm
            extra["motion_mm"] = reg.motion_mm
    rows: list[Row] = []
    for origin in sample_origins(
        labels > 0, patch, config.patches_per_subject, rng, z_range=z_range
    ):
        chosen = rng.choice(len(pairs), size=min(opts.pairs_per_patch, len(pairs)), replace=False)
        for src, tgt in (pairs[i] for i in chosen):
            target = truth[tgt] if split == "val" else registered.get((src, tgt), obs[tgt])
            rows.append(
                {
                    "source": crop(inputs[src], origin, patch),
                    "target": crop(target, origin, patch),
                    "truth": crop(truth[tgt], origin, patch),
                    "labels": crop(labels, origin, patch),
                    "source_phase": np.int8(src),
                    "target_phase": np.int8(tgt),
                    "subject": subject,
                    "origin": list(origin),
                }
            )
    stats = {
        "shape": list(data.volume.shape),
        "spacing": [float(s) for s in data.volume.spacing],
        "hu": hu_stats(data.volume.array),
        "extra": {"phases": sorted(PHASES[p] for p in data.truth), **extra},
    }
    return rows, stats


def _phantom_sources(
    count: int, config: BuildConfig, opts: PhaseGANDataOptions
) -> list[SubjectSource]:
    def rows(k: int, subject: str, rng: np.random.Generator, split: str):
        raw, ts = make_phantom(seed=k)
        if opts.psf_sigma_voxels > 0:  # image the ideal phantom through the scanner's PSF
            blurred = ndimage.gaussian_filter(raw.array, opts.psf_sigma_voxels)
            raw = Volume(array=blurred.astype(np.float32), affine=raw.affine)
        native = prepare(raw, config.spacing)
        ts_vol = Volume(array=ts.astype(np.float32), affine=raw.affine)
        ts_arr = prepare(ts_vol, config.spacing, mode="nearest").array.round().astype(np.uint8)
        data = _simulated(native, ts_arr, seed=k, opts=opts)
        return _rows(subject, data, split=split, rng=rng, config=config, opts=opts)

    return phantom_sources(count, rows, version=PHANTOM_VERSION)


def _label_map(scan: Path) -> Path:
    """``NAME_seg.nii[.gz]`` beside a scan: with a NIfTI scan's own suffix; beside a DICOM
    series (``NAME/`` or ``NAME.zip``) the first that exists."""
    stem = volume_stem(scan)
    if is_nifti(scan):
        return scan.with_name(f"{stem}_seg{scan.name[len(stem) :]}")
    candidates = [scan.with_name(f"{stem}_seg{suffix}") for suffix in NIFTI_SUFFIXES]
    return next((p for p in candidates if p.is_file()), candidates[0])


def _native_sources(
    scans: Sequence[Path],
    config: BuildConfig,
    opts: PhaseGANDataOptions,
    skipped: list[dict[str, str]],
) -> list[SubjectSource]:
    sources = []
    for scan in scans:
        seg = _label_map(scan)
        if not seg.is_file():
            skipped.append(
                {
                    "path": str(scan),
                    "reason": f"no organ label map {seg.name}: contrast phases cannot be "
                    "simulated without labels (TotalSegmentator 'total' ids)",
                }
            )
            continue
        checks = {"scan": volume_checksum(scan), "labels": volume_checksum(seg)}
        for j in range(opts.simulations):
            stem = volume_stem(scan)
            subject = stem if opts.simulations == 1 else f"{stem}-sim{j}"

            def make(
                rng: np.random.Generator,
                split: str,
                scan=scan,
                seg=seg,
                j=j,
                subject=subject,
                checks=checks,
            ):
                # compared in canonical order: a label map made from a DICOM series by
                # another converter has the same grid in another voxel order
                native, _ = canonical_ras(load_volume(scan))
                ts, _ = canonical_ras(load_nifti(seg))
                if ts.shape != native.shape or not np.allclose(ts.affine, native.affine, atol=1e-3):
                    raise NiftiError(
                        str(seg),
                        f"label map grid {ts.shape} does not match the scan {native.shape}",
                    )
                native = prepare(native, config.spacing)
                ts_arr = prepare(ts, config.spacing, mode="nearest").array.round().astype(np.uint8)
                seed = int(checks["scan"][:8], 16) + j
                data = _simulated(native, ts_arr, seed=seed, opts=opts)
                return _rows(subject, data, split=split, rng=rng, config=config, opts=opts)

            sources.append(
                SubjectSource(
                    subject=subject,
                    paths={"scan": str(scan), "labels": str(seg)},
                    checksums={**checks, "simulation": str(j)},
                    make_rows=make,
                )
            )
    return sources


def _study_sources(
    folders: Sequence[Path],
    config: BuildConfig,
    opts: PhaseGANDataOptions,
    skipped: list[dict[str, str]],
) -> list[SubjectSource]:
    sources = []
    for folder in folders:
        files: dict[int, Path] = {}
        for path in sorted(folder.iterdir()):
            if not is_volume(path):
                skipped.append({"path": str(path), "reason": f"not {VOLUME_FORMATS}"})
                continue
            try:
                files[parse_phase(volume_stem(path))] = path
            except ValueError as err:
                skipped.append({"path": str(path), "reason": f"file name is not a phase: {err}"})
        if len(files) < 2:
            skipped.append(
                {"path": str(folder), "reason": f"needs at least 2 phases, found {len(files)}"}
            )
            continue

        def make(rng: np.random.Generator, split: str, files=files, subject=folder.name):
            vols = {p: prepare(load_volume(f), config.spacing) for p, f in files.items()}
            ref = vols[min(vols)]
            arrays = {
                p: v.array
                if v.shape == ref.shape and np.allclose(v.affine, ref.affine, atol=1e-3)
                else resample_like(
                    v.array, v.affine, target_affine=ref.affine, target_shape=ref.shape
                )
                for p, v in vols.items()
            }
            native = arrays.get(parse_phase("native"), ref.array)
            data = _Phases(
                observed=arrays,
                truth=arrays,
                val_inputs=arrays,
                z_ranges={p: (0, ref.shape[2]) for p in arrays},
                labels=coarse_labels(None, native),
                volume=ref,
            )
            return _rows(subject, data, split=split, rng=rng, config=config, opts=opts)

        sources.append(
            SubjectSource(
                subject=folder.name,
                paths={PHASES[p]: str(f) for p, f in files.items()},
                checksums={PHASES[p]: volume_checksum(f) for p, f in files.items()},
                make_rows=make,
            )
        )
    return sources


def scan_inputs(
    root: Path, config: BuildConfig, opts: PhaseGANDataOptions, skipped: list[dict[str, str]]
) -> list[SubjectSource]:
    """Sources for every usable input under ``root``; the rest go to ``skipped`` with a reason."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder does not exist")
    scans, folders = [], []
    for path in sorted(root.iterdir()):
        if is_volume(path):
            if not volume_stem(path).endswith("_seg"):
                scans.append(path)
        elif path.is_dir():
            folders.append(path)
        elif not path.name.startswith("."):
            skipped.append({"path": str(path), "reason": f"not {VOLUME_FORMATS}"})
    return _native_sources(scans, config, opts, skipped) + _study_sources(
        folders, config, opts, skipped
    )


def build(
    *,
    out: str | Path,
    inputs: str | Path | None = None,
    phantom: int = 0,
    config: BuildConfig = BuildConfig(),
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Manifest:
    """Build phase-GAN shards from ``inputs`` and/or ``phantom`` demo subjects."""
    opts = from_dict(PhaseGANDataOptions, options, where="phase_gan data options")
    opts.pairs()
    skipped: list[dict[str, str]] = []
    sources = _phantom_sources(phantom, config, opts) if phantom else []
    if inputs is not None:
        sources += scan_inputs(Path(inputs), config, opts, skipped)
    return build_shards(
        family="phase_gan",
        out=out,
        sources=sources,
        skipped=skipped,
        config=config,
        family_options=to_dict(opts),
        progress=progress,
    )
