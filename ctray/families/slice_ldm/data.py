"""Shards for slice_ldm: thick-slice patches with their thin-slice truth, in a recorded HU window.

Inputs (any mix):

* ``phantom=N``: N procedural phantoms on the thin grid, thick scans simulated from them.
* ``INPUT/NAME.nii[.gz]``: thin scans to simulate from (their z spacing must be at most the
  thin spacing, or the "truth" would itself be interpolated).
* ``INPUT/PATIENT/thick.nii[.gz]`` + ``INPUT/PATIENT/thin.nii[.gz]``: real paired studies of one
  patient (same axis directions, overlapping z range); the thick scan's z spacing must match
  the build's thick spacing.

Geometry: ``BuildConfig.spacing`` and ``patch_size`` describe the thick input (e.g. 0.8 x 0.8 x
5 mm); the thin grid has ``spacing[2] / factor`` in z and ``factor`` times the slices, and the
manifest records ``output_scale = (1, 1, factor)``. Thick slice k is centred on thin slices
``k*f .. k*f + f - 1`` (see :mod:`ctray.data.thick_slices`).

Rows: ``thick`` float32 (X, Y, Z) and ``thin`` float32 (X, Y, Z*f) in the HU window's [0, 1],
``body`` uint8 (X, Y, Z*f) (thin HU > -500), ``subject``, ``z`` (thick slice of the origin).

Options (``--option KEY=VALUE``): ``factor`` (5), ``profile`` (box | gaussian), ``noise_sd``
(HU added to the thick slices, 0), ``max_source_spacing`` (how much coarser than the thin
spacing a thin scan may be, 1.25).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
    HUWindow,
    NiftiError,
    Volume,
    canonical_ras,
    resample_like,
)
from ctray.data.phantom import PhantomConfig, make_phantom
from ctray.data.shards import Manifest
from ctray.data.thick_slices import Profile, ThickSliceConfig, simulate_thick, thick_affine
from ctray.data.volumes import (
    VOLUME_FORMATS,
    is_volume,
    load_volume,
    volume_checksum,
    volume_stem,
)

PHANTOM_VERSION = "slice_ldm-phantom-v1"
BODY_HU = -500.0
AIR_HU = -1000.0
MIN_CT_HU = -200.0  # every CT with some air or fat in it has voxels below this
PAIR_NAMES = ("thick", "thin")
# The phantom keeps the default phantom's world extent (mm) at whatever thin spacing.
PHANTOM_EXTENT_MM = tuple(
    n * s for n, s in zip(PhantomConfig().shape, PhantomConfig().spacing, strict=True)
)


@dataclass(frozen=True, kw_only=True)
class SliceLDMDataOptions:
    """Family-specific build options.

    Attributes:
        factor: thin slices per thick slice (5 mm -> 1 mm is 5).
        profile: slice profile of the simulated thick slices (box | gaussian).
        noise_sd: extra Gaussian noise (HU) on simulated thick slices.
        max_source_spacing: a thin scan to simulate from may have a z spacing of at most this
            times the thin spacing.
    """

    factor: int = 5
    profile: Profile = "box"
    noise_sd: float = 0.0
    max_source_spacing: float = 1.25

    def __post_init__(self) -> None:
        ThickSliceConfig(factor=self.factor, profile=self.profile, noise_sd=self.noise_sd)
        if self.factor < 2:
            raise ValueError(f"factor must be >= 2 thin slices per thick slice, got {self.factor}")

    @property
    def simulation(self) -> ThickSliceConfig:
        return ThickSliceConfig(factor=self.factor, profile=self.profile, noise_sd=self.noise_sd)


def thin_spacing(config: BuildConfig, factor: int) -> tuple[float, float, float]:
    """The thin grid's spacing: the thick spacing with z divided by ``factor``."""
    sx, sy, sz = (float(s) for s in config.spacing)
    return (sx, sy, sz / factor)


def patch_rows(
    subject: str,
    thick: np.ndarray,
    thin: np.ndarray,
    *,
    factor: int,
    config: BuildConfig,
    rng: np.random.Generator,
) -> list[Row]:
    """Aligned thick (X, Y, Z) and thin (X, Y, Z*f) HU arrays -> normalised patch rows.

    Raises:
        ValueError: when the arrays are not on matching grids (naming the fix).
    """
    if thin.shape[:2] != thick.shape[:2] or thin.shape[2] != thick.shape[2] * factor:
        raise ValueError(
            f"{subject}: thin {thin.shape} is not thick {thick.shape} with {factor}x the slices; "
            "put both on one in-plane grid and crop the thin scan to whole slabs"
        )
    patch = tuple(int(p) for p in config.patch_size)
    thick = pad_to(thick, patch, AIR_HU)
    thin = pad_to(thin, (*patch[:2], patch[2] * factor), AIR_HU)
    if thin.shape[2] != thick.shape[2] * factor:  # the thick scan was padded in z
        thin = pad_to(thin, (*thin.shape[:2], thick.shape[2] * factor), AIR_HU)
    body_thick = thick > BODY_HU
    if not body_thick.any():
        raise ValueError(f"{subject}: no body (HU > {BODY_HU:g}) in the scan; is it in HU?")
    origins = sample_origins(body_thick, patch, config.patches_per_subject, rng)
    window = HUWindow(lo=config.window_lo, hi=config.window_hi)
    thin_patch = (*patch[:2], patch[2] * factor)
    rows = []
    for x, y, z in origins:
        thin_hu = crop(thin, (x, y, z * factor), thin_patch)
        rows.append(
            {
                "thick": window.normalise(crop(thick, (x, y, z), patch)).astype(np.float32),
                "thin": window.normalise(thin_hu).astype(np.float32),
                "body": (thin_hu > BODY_HU).astype(np.uint8),
                "subject": subject,
                "z": int(z),
            }
        )
    return rows


def _stats(thin: Volume, thick_shape: tuple[int, ...], rows: list[Row], **extra: Any):
    return {
        "shape": list(thin.shape),
        "spacing": [float(s) for s in thin.spacing],
        "hu": hu_stats(thin.array),
        "extra": {"patches": len(rows), "thick_shape": list(thick_shape), **extra},
    }


def simulated_rows(
    subject: str,
    thin: Volume,
    *,
    opts: SliceLDMDataOptions,
    config: BuildConfig,
    rng: np.random.Generator,
) -> tuple[list[Row], dict[str, Any]]:
    """Rows of a thin volume already on the thin grid (canonical RAS): simulate, then patch."""
    thick, truth = simulate_thick(thin, opts.simulation, rng=rng)
    rows = patch_rows(subject, thick.array, truth.array, factor=opts.factor, config=config, rng=rng)
    return rows, _stats(truth, thick.shape, rows, simulated=True)


def phantom_thin(seed: int, spacing: tuple[float, float, float]) -> Volume:
    """A phantom on the thin grid (the default phantom's world extent), in HU."""
    shape = tuple(max(8, round(e / s)) for e, s in zip(PHANTOM_EXTENT_MM, spacing, strict=True))
    vol, _ = make_phantom(seed=seed, config=PhantomConfig(shape=shape, spacing=spacing))
    return vol


def _phantom_sources(
    count: int, opts: SliceLDMDataOptions, config: BuildConfig
) -> list[SubjectSource]:
    spacing = thin_spacing(config, opts.factor)

    def rows(k: int, subject: str, rng: np.random.Generator, split: str):
        return simulated_rows(subject, phantom_thin(k, spacing), opts=opts, config=config, rng=rng)

    return phantom_sources(count, rows, version=f"{PHANTOM_VERSION}:{spacing}")


def on_thin_grid(ras: Volume, path: Path, spacing: tuple[float, float, float], max_ratio: float):
    """A canonical thin scan resampled to the thin grid; refuses scans too coarse in z.

    Raises:
        NiftiError: when the scan's slices are thicker than ``max_ratio`` thin slices, or it
            does not look like CT in HU.
    """
    check_hu(ras, path)
    if ras.spacing[2] > max_ratio * spacing[2]:
        raise NiftiError(
            str(path),
            f"z spacing {ras.spacing[2]:.2f} mm is coarser than the thin spacing "
            f"{spacing[2]:.2f} mm (x{max_ratio:g} allowed): its 'thin truth' would be "
            "interpolated; use thinner slices, a thicker --spacing z or a smaller factor",
        )
    return prepare(ras, spacing)


def check_hu(vol: Volume, path: Path) -> None:
    """Refuse volumes without air or fat (e.g. a label map next to the scans)."""
    low = float(vol.array.min())
    if low > MIN_CT_HU:
        raise NiftiError(
            str(path),
            f"no voxel below {MIN_CT_HU:g} HU (minimum {low:g}): not a CT in Hounsfield units "
            "(a label map or a rescaled image?); move it out of the input folder",
        )


def load_thin_scan(path: Path, spacing: tuple[float, float, float], max_ratio: float) -> Volume:
    """A thin scan file in canonical RAS on the thin grid."""
    ras, _ = canonical_ras(load_volume(path))
    return on_thin_grid(ras, path, spacing, max_ratio)


def paired_volumes(
    thick_path: Path, thin_path: Path, config: BuildConfig, opts: SliceLDMDataOptions
) -> tuple[Volume, Volume]:
    """A real thick/thin pair as (thick on the thick grid, thin on the thin grid).

    The thin scan is resampled to the thin spacing; the thick scan is resampled onto the
    thick grid of those thin slabs (same in-plane grid, slab centres in z).

    Raises:
        NiftiError: naming the file and the fix, for pairs that do not describe one region.
    """
    factor, thick_spacing = opts.factor, float(config.spacing[2])
    thick, _ = canonical_ras(load_volume(thick_path))
    thin, _ = canonical_ras(load_volume(thin_path))
    check_hu(thick, thick_path)
    if abs(thick.spacing[2] - thick_spacing) > 0.1 * thick_spacing:
        raise NiftiError(
            str(thick_path),
            f"thick z spacing {thick.spacing[2]:.2f} mm differs from the build's thick spacing "
            f"{thick_spacing:.2f} mm; pass --spacing X Y {thick.spacing[2]:.2f} (and a factor "
            "that matches the thin scan)",
        )
    directions = [
        a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0) for a in (thick.affine, thin.affine)
    ]
    if not np.allclose(directions[0], directions[1], atol=1e-3):
        raise NiftiError(str(thick_path), "axis directions differ from thin's; register the pair")
    thin = on_thin_grid(thin, thin_path, thin_spacing(config, factor), opts.max_source_spacing)
    n = thin.shape[2] // factor
    if n < 1:
        raise NiftiError(str(thin_path), f"fewer than {factor} thin slices after resampling")
    thin = Volume(array=np.ascontiguousarray(thin.array[:, :, : n * factor]), affine=thin.affine)
    grid = thick_affine(thin.affine, factor)
    gap = _z_gap(thick, grid, n)
    if gap > 0.5 * thick_spacing:
        raise NiftiError(
            str(thick_path),
            f"thick and thin scans cover different z ranges (off by {gap:.1f} mm); crop both "
            "to the same range",
        )
    arr = resample_like(
        thick.array, thick.affine, target_affine=grid, target_shape=(*thin.shape[:2], n)
    )
    return Volume(array=arr, affine=grid), thin


def _z_range(affine: np.ndarray, slices: int) -> tuple[float, float]:
    ends = [float((affine @ np.array([0.0, 0.0, k, 1.0]))[2]) for k in (0, slices - 1)]
    return min(ends), max(ends)


def _z_gap(thick: Volume, grid: np.ndarray, slices: int) -> float:
    """How far (mm) the thick scan's slice-centre z range is from the target grid's."""
    a, b = _z_range(thick.affine, thick.shape[2]), _z_range(grid, slices)
    return max(abs(a[0] - b[0]), abs(a[1] - b[1]))


def find_inputs(root: Path, skipped: list[dict[str, str]]) -> tuple[list[Path], list[Path]]:
    """Thin scans (``root/*.nii[.gz]``, DICOM series folders or zips) and paired study
    folders (``root/*/thick+thin``, each a NIfTI file or a DICOM series)."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: input folder does not exist (expected thin scans *.nii.gz and/or "
            "folders with thick.nii.gz + thin.nii.gz)"
        )
    scans, pairs = [], []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if is_volume(path):
            scans.append(path)
        elif path.is_dir():
            names = {volume_stem(p): p for p in path.iterdir() if is_volume(p)}
            missing = [n for n in PAIR_NAMES if n not in names]
            if missing:
                skipped.append(
                    {
                        "path": str(path),
                        "reason": "a paired study needs thick and thin, each "
                        f"{VOLUME_FORMATS} (missing {', '.join(missing)})",
                    }
                )
            else:
                pairs.append(path)
        else:
            skipped.append({"path": str(path), "reason": f"not {VOLUME_FORMATS} or a study folder"})
    return scans, pairs


def _pair_file(folder: Path, name: str) -> Path:
    return next(p for p in folder.iterdir() if is_volume(p) and volume_stem(p) == name)


def _file_sources(
    root: Path,
    opts: SliceLDMDataOptions,
    config: BuildConfig,
    skipped: list[dict[str, str]],
) -> list[SubjectSource]:
    scans, pairs = find_inputs(root, skipped)
    spacing = thin_spacing(config, opts.factor)
    sources = []
    for scan in scans:

        def make(rng: np.random.Generator, split: str, scan: Path = scan):
            thin = load_thin_scan(scan, spacing, opts.max_source_spacing)
            return simulated_rows(volume_stem(scan), thin, opts=opts, config=config, rng=rng)

        sources.append(
            SubjectSource(
                subject=volume_stem(scan),
                paths={"thin": str(scan)},
                checksums={"thin": volume_checksum(scan)},
                make_rows=make,
            )
        )
    for folder in pairs:  # a folder named like a scan is skipped as a duplicate by build_shards
        files = {n: _pair_file(folder, n) for n in PAIR_NAMES}

        def make_pair(rng: np.random.Generator, split: str, folder=folder, files=files):
            thick, thin = paired_volumes(files["thick"], files["thin"], config, opts)
            rows = patch_rows(
                folder.name, thick.array, thin.array, factor=opts.factor, config=config, rng=rng
            )
            return rows, _stats(thin, thick.shape, rows, simulated=False)

        sources.append(
            SubjectSource(
                subject=folder.name,
                paths={n: str(p) for n, p in files.items()},
                checksums={n: volume_checksum(p) for n, p in files.items()},
                make_rows=make_pair,
            )
        )
    return sources


def build(
    *,
    out: str | Path,
    inputs: str | Path | None = None,
    phantom: int = 0,
    config: BuildConfig = BuildConfig(),
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Manifest:
    """Build slice_ldm shards from thin scans, paired studies and/or ``phantom`` subjects.

    ``config.patch_size`` / ``config.spacing`` are the thick patch and spacing; the manifest
    records ``output_scale = (1, 1, factor)`` so training and inference know the thin grid.
    """
    opts = from_dict(SliceLDMDataOptions, options, where="slice_ldm data options")
    config = dataclasses.replace(config, output_scale=(1, 1, opts.factor))
    skipped: list[dict[str, str]] = []
    sources = _phantom_sources(phantom, opts, config) if phantom else []
    if inputs is not None:
        sources += _file_sources(Path(inputs), opts, config, skipped)
    return build_shards(
        family="slice_ldm",
        out=out,
        sources=sources,
        skipped=skipped,
        config=config,
        family_options=to_dict(opts),
        progress=progress,
    )
