"""Shards for xray2ct: X-ray views (DRRs or real radiographs) paired with the CT they show.

Inputs (``--input ROOT``), any mix of:

* ``ROOT/NAME.nii[.gz]``: a CT; its views are rendered (DRRs, ``ctray.data.drr``).
* ``ROOT/NAME/ct.nii[.gz]`` with one image per view, named by view (``ap.png``,
  ``lateral.tif``, ``angle45.nii.gz`` ...; PNG, 8/16-bit TIFF or 2D NIfTI, decoded by
  ``ctray.data.images`` as the server does): a real paired study. Its radiographs are used
  as they are (attenuation polarity, bone bright; the option ``invert=true`` for
  transmission images) and are assumed to follow the build's geometry with the isocentre at
  the CT volume's centre. A study folder without any view image is
  rendered like a CT file; one with only some of the views is skipped with the reason.

``phantom=N`` adds N procedural phantom subjects (``ctray.data.phantom``).

The output grid is ``config.patch_size`` voxels at ``config.spacing`` (canonical RAS), centred
on the CT volume's centre (the isocentre); outside the scan is air. Each CT subject gives
``config.patches_per_subject`` samples: the first as scanned, the others after a random rigid
motion of the patient (``max_rotation_deg``, ``max_shift_mm``), so one scan yields several
view/volume pairs. Views are rendered from the same box on a grid ``oversample`` times finer
(the target is that grid average-pooled to the output grid), with Poisson noise of
``photons`` per pixel, and normalised per image (``normalise_views``). Since the views see
only that box, the model's projection-consistency loss has an exact optimum; real radiographs
also see anatomy outside it.

Row columns: ``views`` float32 (V, H, W) normalised, ``ct`` float32 (X, Y, Z) in the HU
window's [0, 1], ``body`` uint8 (X, Y, Z) (HU > -500), ``angles`` float32 (V,) degrees,
``geometry`` float32 (``DRRGeometry.as_vector``), ``subject``, ``sample``. The manifest's
``build.family_options.geometry`` describes the views.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctray.config import from_dict, to_dict
from ctray.data.build import BuildConfig, Row, SubjectSource, build_shards, hu_stats
from ctray.data.drr import (
    DRRGeometry,
    Projector,
    add_poisson_noise,
    hu_to_mu,
    normalise_views,
    view_name,
)
from ctray.data.images import SUFFIXES, read_view
from ctray.data.nifti import (
    HUWindow,
    NiftiError,
    Volume,
    canonical_ras,
    is_label_map,
)
from ctray.data.phantom import PhantomConfig, make_phantom
from ctray.data.shards import Manifest
from ctray.data.volumes import (
    VOLUME_FORMATS,
    is_volume,
    load_volume,
    volume_checksum,
    volume_stem,
)

from .config import ViewSettings

PHANTOM_VERSION = "xray2ct-phantom-v1"
BODY_HU = -500.0
AIR_HU = -1000.0
VIEW_SUFFIXES = SUFFIXES  # what ctray.data.images decodes
ASPECT_TOLERANCE = 0.10


@dataclass(frozen=True, kw_only=True)
class XRay2CTDataOptions(ViewSettings):
    """Family-specific build options (the geometry fields are those of the model config).

    Attributes:
        rendered_angles: gantry angles rendered, degrees; models use any subset of them (a
            model's own ``view_angles`` / ``num_views`` pick it).
        photons: quantum noise, photons per pixel without attenuation (None: noise-free).
        oversample: views are rendered from a grid this many times finer than the output.
        max_rotation_deg / max_shift_mm: random rigid motion of the samples after the first.
        render_step_mm: ray step of the DRRs (None: one fine voxel).
        invert: real radiographs are transmission images (air bright): invert them.
    """

    rendered_angles: tuple[float, ...] = (0.0, 45.0, 90.0, 135.0)
    photons: float | None = 1e5
    oversample: int = 2
    max_rotation_deg: float = 4.0
    max_shift_mm: float = 8.0
    render_step_mm: float | None = None
    invert: bool = False

    def __post_init__(self) -> None:
        if not self.rendered_angles:
            raise ValueError("rendered_angles must list at least one angle")
        if self.oversample < 1:
            raise ValueError(f"oversample must be >= 1, got {self.oversample}")
        if self.photons is not None and self.photons <= 0:
            raise ValueError(f"photons must be > 0 (or null for no noise), got {self.photons}")
        if self.max_rotation_deg < 0 or self.max_shift_mm < 0:
            raise ValueError("max_rotation_deg and max_shift_mm must be >= 0")

    @property
    def view_names(self) -> list[str]:
        return [view_name(a) for a in self.rendered_angles]


# --------------------------------------------------------------------------- grids


def grid_affine(patch_size: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine of an output grid centred on the world origin (the isocentre)."""
    sp = np.asarray(spacing, dtype=np.float64)
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = -(np.asarray(patch_size, dtype=np.float64) - 1) * sp / 2.0
    return affine


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    a, b, c = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def volume_centre(vol: Volume) -> np.ndarray:
    """World position of the middle of the volume's voxel grid."""
    mid = (np.asarray(vol.shape, dtype=np.float64) - 1) / 2.0
    return (vol.affine @ np.append(mid, 1.0))[:3]


def resample_to_grid(
    vol: Volume,
    patch_size: Sequence[int],
    spacing: Sequence[float],
    *,
    rotation: np.ndarray | None = None,
    shift_mm: Sequence[float] = (0.0, 0.0, 0.0),
) -> torch.Tensor:
    """HU of ``vol`` on a grid centred on its centre (trilinear, air outside the scan).

    ``rotation`` / ``shift_mm`` move the patient rigidly (about the volume centre) first.
    """
    rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(patch_size, spacing, strict=True)]
    q = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    world = volume_centre(vol) + q @ rot.T + np.asarray(shift_mm, dtype=np.float64)
    index = (np.linalg.inv(vol.affine) @ np.c_[world, np.ones(len(world))].T)[:3].T
    norm = index / (np.asarray(vol.shape, dtype=np.float64) - 1).clip(min=1) * 2.0 - 1.0
    grid = torch.as_tensor(norm[:, ::-1].copy(), dtype=torch.float32)
    grid = grid.reshape(1, *patch_size, 3)
    shifted = torch.as_tensor(np.asarray(vol.array, dtype=np.float32) - AIR_HU)[None, None]
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0] + AIR_HU


# --------------------------------------------------------------------------- views


def prepare_views(
    arrays: Sequence[Any],
    geometry: DRRGeometry,
    *,
    invert: bool = False,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Decoded 2D images, in view order -> normalised views (1, V, H, W) for the model.

    Checks the count, that every image is 2D and finite, and that its aspect ratio is within
    10% of the detector's; resizes (bilinear, antialiased) to the detector; inverts
    transmission images if asked; normalises each image like the training views.
    """
    names = list(names or [view_name(a) for a in geometry.angles])
    want = geometry.views
    if len(arrays) != want:
        raise ValueError(
            f"expected {want} view(s) in this order: {', '.join(names)} "
            f"(gantry angles {', '.join(f'{a:g}' for a in geometry.angles)} deg); "
            f"got {len(arrays)}"
        )
    h, w = geometry.detector
    out = []
    for name, raw in zip(names, arrays, strict=True):
        arr = np.asarray(raw.detach().cpu() if isinstance(raw, torch.Tensor) else raw)
        arr = np.squeeze(arr)
        if arr.ndim != 2:
            raise ValueError(f"view {name!r}: expected a 2D image, got shape {arr.shape}")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"view {name!r}: contains NaN or infinite values")
        ratio = (arr.shape[0] / arr.shape[1]) / (h / w)
        if abs(ratio - 1.0) > ASPECT_TOLERANCE:
            raise ValueError(
                f"view {name!r}: {arr.shape[0]}x{arr.shape[1]} px (rows x columns) differs in "
                f"aspect ratio from the {h}x{w} detector by {abs(ratio - 1):.0%} (> 10%); "
                "crop it to the detector's aspect ratio first"
            )
        t = torch.as_tensor(arr)[None, None]
        if tuple(arr.shape) != (h, w):
            t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        if invert:
            t = -t
        out.append(t[0, 0])
    return normalise_views(torch.stack(out)[None])


def render_views(
    hu: torch.Tensor,
    projector: Projector,
    *,
    photons: float | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Normalised, optionally noisy DRRs (V, H, W) of one HU volume (X, Y, Z)."""
    lines = projector(hu_to_mu(hu[None], projector.geometry.mu_water))
    if photons is not None:
        lines = add_poisson_noise(lines, photons, generator=generator)
    return normalise_views(lines)[0]


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything a subject's rows depend on (built once per build)."""

    config: BuildConfig
    opts: XRay2CTDataOptions
    geometry: DRRGeometry
    window: HUWindow

    @property
    def fine_shape(self) -> tuple[int, int, int]:
        return tuple(int(p) * self.opts.oversample for p in self.config.patch_size)

    @property
    def fine_spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) / self.opts.oversample for s in self.config.spacing)

    def projector(self) -> Projector:
        return Projector(
            self.geometry, self.fine_shape, self.fine_spacing, step_mm=self.opts.render_step_mm
        )


def make_plan(config: BuildConfig, opts: XRay2CTDataOptions) -> Plan:
    geometry = opts.geometry(opts.rendered_angles, config.patch_size, config.spacing)
    return Plan(
        config=config,
        opts=opts,
        geometry=geometry,
        window=HUWindow(lo=config.window_lo, hi=config.window_hi),
    )


def _target(fine_hu: torch.Tensor, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """The output-grid CT in [0, 1] and its body mask, from the fine grid."""
    k = plan.opts.oversample
    hu = F.avg_pool3d(fine_hu[None, None], k)[0, 0] if k > 1 else fine_hu
    ct = plan.window.normalise(hu).numpy().astype(np.float32)
    body = (hu > BODY_HU).numpy().astype(np.uint8)
    return ct, body


def _row(
    subject: str, sample: int, views: torch.Tensor, ct: np.ndarray, body: np.ndarray, plan: Plan
) -> Row:
    return {
        "views": np.ascontiguousarray(views.numpy(), dtype=np.float32),
        "ct": np.ascontiguousarray(ct),
        "body": np.ascontiguousarray(body),
        "angles": np.asarray(plan.geometry.angles, dtype=np.float32),
        "geometry": np.asarray(plan.geometry.as_vector(), dtype=np.float32),
        "subject": subject,
        "sample": int(sample),
    }


def ct_rows(
    subject: str, vol: Volume, plan: Plan, projector: Projector, rng: np.random.Generator
) -> list[Row]:
    """``patches_per_subject`` rendered samples of one CT (the first without motion)."""
    vol, _ = canonical_ras(vol)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    rows = []
    for k in range(max(1, plan.config.patches_per_subject)):
        rotation, shift = None, np.zeros(3)
        if k > 0:
            rot_max = plan.opts.max_rotation_deg
            rotation = _rotation(rng.uniform(-rot_max, rot_max, size=3))
            shift = rng.uniform(-plan.opts.max_shift_mm, plan.opts.max_shift_mm, size=3)
        fine = resample_to_grid(
            vol, plan.fine_shape, plan.fine_spacing, rotation=rotation, shift_mm=shift
        )
        views = render_views(fine, projector, photons=plan.opts.photons, generator=gen)
        ct, body = _target(fine, plan)
        rows.append(_row(subject, k, views, ct, body, plan))
    return rows


def study_rows(subject: str, vol: Volume, images: Sequence[Path], plan: Plan) -> list[Row]:
    """One row of a real paired study: its radiographs and its CT on the output grid."""
    vol, _ = canonical_ras(vol)
    arrays = [read_view(p) for p in images]
    views = prepare_views(arrays, plan.geometry, invert=plan.opts.invert)[0]
    fine = resample_to_grid(vol, plan.fine_shape, plan.fine_spacing)
    ct, body = _target(fine, plan)
    return [_row(subject, 0, views, ct, body, plan)]


def _stats(vol: Volume, rows: list[Row], **extra: Any) -> dict[str, Any]:
    return {
        "shape": list(vol.shape),
        "spacing": [float(s) for s in vol.spacing],
        "hu": hu_stats(vol.array),
        "extra": {"samples": len(rows), **extra},
    }


# --------------------------------------------------------------------------- sources


def _view_file(folder: Path, name: str) -> Path | None:
    for suffix in VIEW_SUFFIXES:
        candidate = folder / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _ct_file(folder: Path) -> Path | None:
    """The study's CT: ct.nii.gz, ct.nii, a DICOM series folder ct/ or ct.zip."""
    for name in ("ct.nii.gz", "ct.nii", "ct", "ct.zip"):
        if (folder / name).exists() and is_volume(folder / name):
            return folder / name
    return None


def find_inputs(
    root: Path, view_names: Sequence[str], skipped: list[dict[str, str]]
) -> tuple[list[tuple[str, Path]], list[tuple[str, Path, list[Path]]]]:
    """CTs to render ``(subject, path)`` and real studies ``(subject, ct, view images)``."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder does not exist")
    cts: list[tuple[str, Path]] = []
    studies: list[tuple[str, Path, list[Path]]] = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and is_label_map(path):
            skipped.append({"path": str(path), "reason": "an organ label map (*_seg), not a CT"})
        elif is_volume(path):
            cts.append((volume_stem(path), path))
        elif path.is_dir():
            ct = _ct_file(path)
            if ct is None:
                reason = "study folder without a CT (ct.nii[.gz], a ct/ DICOM series or ct.zip)"
                skipped.append({"path": str(path), "reason": reason})
                continue
            found = {n: _view_file(path, n) for n in view_names}
            present = [n for n, p in found.items() if p is not None]
            if not present:
                cts.append((path.name, ct))
            elif len(present) < len(view_names):
                missing = [n for n in view_names if found[n] is None]
                skipped.append(
                    {
                        "path": str(path),
                        "reason": f"missing view image(s) {', '.join(missing)} "
                        f"({'/'.join(VIEW_SUFFIXES)}); views needed: {', '.join(view_names)}",
                    }
                )
            else:
                studies.append((path.name, ct, [found[n] for n in view_names]))  # type: ignore[misc]
        else:
            skipped.append({"path": str(path), "reason": f"not {VOLUME_FORMATS} or a study folder"})
    return cts, studies


def _checksums(paths: dict[str, Path], skipped: list[dict[str, str]]) -> dict[str, str] | None:
    try:
        return {k: volume_checksum(p) for k, p in paths.items()}
    except OSError as err:
        skipped.append({"path": str(err.filename), "reason": f"cannot read ({err})"})
        return None


def _file_sources(
    root: Path, plan: Plan, projector: Projector, skipped: list[dict[str, str]]
) -> list[SubjectSource]:
    cts, studies = find_inputs(root, plan.opts.view_names, skipped)
    sources = []
    for subject, path in cts:
        checks = _checksums({"ct": path}, skipped)
        if checks is None:
            continue

        def make(rng: np.random.Generator, split: str, path: Path = path, subject: str = subject):
            vol = load_volume(path)
            rows = ct_rows(subject, vol, plan, projector, rng)
            return rows, _stats(vol, rows, views="rendered")

        sources.append(
            SubjectSource(
                subject=subject, paths={"ct": str(path)}, checksums=checks, make_rows=make
            )
        )
    for subject, ct, images in studies:
        files = {"ct": ct, **{n: p for n, p in zip(plan.opts.view_names, images, strict=True)}}
        checks = _checksums(files, skipped)
        if checks is None:
            continue

        def make_study(
            rng: np.random.Generator,
            split: str,
            ct: Path = ct,
            images: list[Path] = images,
            subject: str = subject,
        ):
            vol = load_volume(ct)
            try:
                rows = study_rows(subject, vol, images, plan)
            except ValueError as err:
                raise NiftiError(str(images[0].parent), str(err)) from err
            return rows, _stats(vol, rows, views="radiographs")

        sources.append(
            SubjectSource(
                subject=subject,
                paths={k: str(p) for k, p in files.items()},
                checksums=checks,
                make_rows=make_study,
            )
        )
    return sources


def _phantom_sources(count: int, plan: Plan, projector: Projector) -> list[SubjectSource]:
    sources = []
    for k in range(count):
        subject = f"phantom-{k:03d}"
        key = hashlib.sha256(f"{PHANTOM_VERSION}:{PhantomConfig()}:{k}".encode()).hexdigest()

        def make(rng: np.random.Generator, split: str, seed: int = k, subject: str = subject):
            vol, _ = make_phantom(seed)
            rows = ct_rows(subject, vol, plan, projector, rng)
            return rows, _stats(vol, rows, views="rendered")

        sources.append(
            SubjectSource(
                subject=subject,
                paths={"phantom": f"phantom:seed={k}"},
                checksums={"phantom": key},
                make_rows=make,
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
    """Build xray2ct shards from CTs, paired studies and/or ``phantom`` subjects.

    ``config.patch_size`` / ``config.spacing`` are the output CT grid (a box centred on the
    isocentre); ``config.patches_per_subject`` is the number of rendered samples per CT.
    """
    opts = from_dict(XRay2CTDataOptions, options, where="xray2ct data options")
    config = dataclasses.replace(config, patch_size=tuple(int(p) for p in config.patch_size))
    plan = make_plan(config, opts)
    projector = plan.projector()
    skipped: list[dict[str, str]] = []
    sources = _phantom_sources(phantom, plan, projector) if phantom else []
    if inputs is not None:
        sources += _file_sources(Path(inputs), plan, projector, skipped)
    family_options = {
        **to_dict(opts),
        "geometry": plan.geometry.describe(),
        "view_names": opts.view_names,
    }
    return build_shards(
        family="xray2ct",
        out=out,
        sources=sources,
        skipped=skipped,
        config=config,
        family_options=family_options,
        progress=progress,
    )
