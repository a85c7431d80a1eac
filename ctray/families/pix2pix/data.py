"""Shards for pix2pix: paired (A, B) CT volumes as axial 2D slices in a recorded HU window.

Inputs, matched by file name (``.nii`` / ``.nii.gz``; the seed's layout)::

    ROOT/trainA/NAME.nii.gz   input (e.g. native)         ROOT/trainB/NAME.nii.gz   target
    ROOT/testA/NAME.nii.gz    optional; with testB, these pairs are the validation split
    ROOT/testB/NAME.nii.gz    (otherwise the split is drawn per subject)

or a manifest ``pairs.csv`` with a header and one pair per row: columns ``a``, ``b`` (paths,
relative to the CSV's folder) and optionally ``subject`` (it names the shard file, so a row whose
subject is not a safe file name, e.g. ``../x``, is skipped naming its line) and ``split``
(``train`` / ``val``; if any row gives one, rows without it train). ``phantom=N`` adds N demo
subjects: A = the phantom's native truth, B = its simulated venous truth (perfectly paired).

Geometry rule: after canonical RAS orientation, B must match A's grid (shape and affine within
1e-3) or differ only in spacing: the same axis directions and the same world extent (voxel-edge
bounding box within half of the coarser voxel). B is then resampled onto A's grid (bilinear).
Anything else is skipped with the reason (``--strict``: an error), as are unreadable files and
an A without its B (or a B without its A).

Every axial slice with enough body becomes a row: ``a`` and ``b`` float32 (R, R) in the HU
window (resized in-plane to ``resize_to``, aspect ratio not kept, as in the seed; z is never
resampled), ``labels`` uint8 body mask (A's HU > -500), ``subject``, ``slice``. Unlike the seed,
intensities are never rescaled per slice: the window is recorded, so outputs map back to HU.
"""

from __future__ import annotations

import csv
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
    hu_stats,
    phantom_sources,
    subject_name_error,
)
from ctray.data.nifti import (
    HUWindow,
    NiftiError,
    Volume,
    canonical_ras,
    resample_like,
)
from ctray.data.phantom import PhantomConfig, make_phantom
from ctray.data.phases import NATIVE_INDEX, SimulatorConfig, parse_phase, simulate_phases
from ctray.data.shards import Manifest
from ctray.data.slices import resize_slices
from ctray.data.volumes import (
    VOLUME_FORMATS,
    is_volume,
    load_volume,
    volume_checksum,
    volume_stem,
)
from ctray.metrics import LABEL_CLASSES

PHANTOM_VERSION = "pix2pix-phantom-v1"
BODY_HU = -500.0
AFFINE_TOL = 1e-3


@dataclass(frozen=True, kw_only=True)
class Pix2PixDataOptions:
    """Family-specific build options.

    Attributes:
        resize_to: in-plane slice size (256 or 512 on GPUs; 64-128 for CPU demos).
        min_body_fraction: slices with less body (HU > -500) than this share are left out.
        max_slices: at most this many slices per subject (drawn at random); None = all.
    """

    resize_to: int = 256
    min_body_fraction: float = 0.05
    max_slices: int | None = None

    def __post_init__(self) -> None:
        if self.resize_to < 8:
            raise ValueError(f"resize_to must be >= 8, got {self.resize_to}")


@dataclass(frozen=True, kw_only=True)
class PairPaths:
    """One A/B pair of volumes (NIfTI files or DICOM series)."""

    subject: str
    a: Path
    b: Path
    split: str | None = None


def _volumes(folder: Path, skipped: list[dict[str, str]]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if is_volume(path):
            found[volume_stem(path)] = path
        else:
            skipped.append({"path": str(path), "reason": f"not {VOLUME_FORMATS}"})
    return found


def match_folders(
    a_dir: Path, b_dir: Path, skipped: list[dict[str, str]], *, split: str | None = None
) -> list[PairPaths]:
    """Pairs of ``a_dir`` and ``b_dir`` matched by file name; the unmatched go to ``skipped``."""
    a_files, b_files = _volumes(a_dir, skipped), _volumes(b_dir, skipped)
    for name in sorted(set(a_files) - set(b_files)):
        reason = f"no partner {name} in {b_dir.name}/ (pairs are matched by name)"
        skipped.append({"path": str(a_files[name]), "reason": reason})
    for name in sorted(set(b_files) - set(a_files)):
        reason = f"no partner {name} in {a_dir.name}/ (pairs are matched by name)"
        skipped.append({"path": str(b_files[name]), "reason": reason})
    return [
        PairPaths(subject=n, a=a_files[n], b=b_files[n], split=split)
        for n in sorted(set(a_files) & set(b_files))
    ]


def read_pairs_csv(path: Path, skipped: list[dict[str, str]]) -> list[PairPaths]:
    """Pairs from a CSV manifest (columns a, b, optional subject and split)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"a", "b"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: pair manifest needs columns a,b (missing {sorted(missing)})")
        rows = list(reader)
    pairs, seen = [], set()
    for i, row in enumerate(rows, start=2):
        a, b = (row.get("a") or "").strip(), (row.get("b") or "").strip()
        if not a or not b:
            which = "A without B" if a else "B without A" if b else "empty a and b"
            skipped.append({"path": a or b or str(path), "reason": f"line {i}: {which}"})
            continue
        pa, pb = (p if Path(p).is_absolute() else path.parent / p for p in (a, b))
        subject = (row.get("subject") or "").strip() or volume_stem(Path(pa))
        problem = subject_name_error(subject)
        if problem is not None:  # it would become a shard file name: never a path elsewhere
            reason = f"line {i}: subject {subject!r} {problem}"
            skipped.append({"path": str(path), "reason": reason})
            continue
        if subject in seen:
            skipped.append({"path": str(pa), "reason": f"line {i}: duplicate subject {subject!r}"})
            continue
        seen.add(subject)
        split = (row.get("split") or "").strip() or None
        pairs.append(PairPaths(subject=subject, a=Path(pa), b=Path(pb), split=split))
    return pairs


def find_pairs(root: Path, skipped: list[dict[str, str]]) -> list[PairPaths]:
    """Pairs from a ``trainA``/``trainB`` (+ ``testA``/``testB``) folder or a CSV manifest."""
    if root.is_file():
        return read_pairs_csv(root, skipped)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder or pair manifest does not exist")
    if not (root / "trainA").is_dir() or not (root / "trainB").is_dir():
        raise FileNotFoundError(
            f"{root}: expected trainA/ and trainB/ folders (files paired by name) or a CSV "
            "manifest with columns a,b"
        )
    has_test = (root / "testA").is_dir(), (root / "testB").is_dir()
    if any(has_test) and not all(has_test):
        lone = root / ("testA" if has_test[0] else "testB")
        skipped.append({"path": str(lone), "reason": "testA/ and testB/ come together; ignored"})
    if all(has_test):
        train = match_folders(root / "trainA", root / "trainB", skipped, split="train")
        test = match_folders(root / "testA", root / "testB", skipped, split="val")
        names = {p.subject for p in train}
        for p in (p for p in test if p.subject in names):
            skipped.append({"path": str(p.a), "reason": f"{p.subject} is also in trainA/ (leak)"})
        return train + [p for p in test if p.subject not in names]
    return match_folders(root / "trainA", root / "trainB", skipped)


def _directions(affine: np.ndarray) -> np.ndarray:
    lin = affine[:3, :3]
    return lin / np.linalg.norm(lin, axis=0)


def _extent(vol: Volume) -> np.ndarray:
    """World bounding box (2, 3) of the voxel edges."""
    lo, hi = np.full(3, -0.5), np.asarray(vol.shape, dtype=np.float64) - 0.5
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])  # fmt: skip
    world = (vol.affine @ corners.T).T[:, :3]
    return np.stack([world.min(0), world.max(0)])


def b_on_a_grid(a: Volume, b: Volume, b_path: str) -> tuple[np.ndarray, bool]:
    """B's voxels on A's grid (both canonical RAS), and whether B had to be resampled.

    Raises:
        NiftiError: naming B, when the grids differ in more than spacing.
    """
    if b.shape == a.shape and np.allclose(b.affine, a.affine, atol=AFFINE_TOL):
        return b.array, False
    if not np.allclose(_directions(a.affine), _directions(b.affine), atol=AFFINE_TOL):
        raise NiftiError(b_path, "geometry mismatch: B's axis directions differ from A's")
    tol = 0.5 * max(*a.spacing, *b.spacing)
    gap = float(np.abs(_extent(a) - _extent(b)).max())
    if gap > tol:
        raise NiftiError(
            b_path,
            f"geometry mismatch: B {b.shape} covers a different world extent than A {a.shape} "
            f"(off by {gap:.1f} mm); register or crop B onto A",
        )
    return resample_like(b.array, b.affine, target_affine=a.affine, target_shape=a.shape), True


def slice_rows(
    subject: str,
    a: np.ndarray,
    b: np.ndarray,
    *,
    window: HUWindow,
    opts: Pix2PixDataOptions,
    rng: np.random.Generator,
) -> list[Row]:
    """Rows of aligned (X, Y, Z) HU arrays: one per axial slice with enough body."""
    size = (opts.resize_to, opts.resize_to)
    a_r, b_r = resize_slices(a, size), resize_slices(b, size)
    body = a_r > BODY_HU
    keep = np.flatnonzero(body.mean(axis=(0, 1)) >= opts.min_body_fraction)
    if len(keep) == 0:
        raise ValueError(
            f"{subject}: no axial slice has {opts.min_body_fraction:.0%} body (HU > {BODY_HU:g})"
        )
    if opts.max_slices is not None and len(keep) > opts.max_slices:
        keep = np.sort(rng.choice(keep, size=opts.max_slices, replace=False))
    a_n, b_n = window.normalise(a_r), window.normalise(b_r)
    labels = body.astype(np.uint8) * np.uint8(LABEL_CLASSES["body"])
    return [
        {
            "a": np.ascontiguousarray(a_n[:, :, z], dtype=np.float32),
            "b": np.ascontiguousarray(b_n[:, :, z], dtype=np.float32),
            "labels": np.ascontiguousarray(labels[:, :, z]),
            "subject": subject,
            "slice": int(z),
        }
        for z in keep
    ]


def load_pair(pair: PairPaths) -> tuple[Volume, np.ndarray, bool]:
    """A (canonical RAS) and B on A's grid, and whether B was resampled; NiftiError if unusable."""
    a, _ = canonical_ras(load_volume(pair.a))
    b, _ = canonical_ras(load_volume(pair.b))
    b_arr, resampled = b_on_a_grid(a, b, str(pair.b))
    return a, b_arr, resampled


def _stats(a: Volume, rows: list[Row], **extra: Any) -> dict[str, Any]:
    return {
        "shape": list(a.shape),
        "spacing": [float(s) for s in a.spacing],
        "hu": hu_stats(a.array),
        "extra": {"slices": len(rows), **extra},
    }


def _file_sources(
    pairs: list[PairPaths],
    window: HUWindow,
    opts: Pix2PixDataOptions,
    skipped: list[dict[str, str]],
) -> list[SubjectSource]:
    sources = []
    for pair in pairs:
        try:
            checks = {"a": volume_checksum(pair.a), "b": volume_checksum(pair.b)}
        except OSError as err:
            skipped.append({"path": str(err.filename or pair.a), "reason": f"cannot read ({err})"})
            continue

        def make(rng: np.random.Generator, split: str, pair: PairPaths = pair):
            a, b, resampled = load_pair(pair)
            rows = slice_rows(pair.subject, a.array, b, window=window, opts=opts, rng=rng)
            return rows, _stats(a, rows, b_resampled=resampled)

        sources.append(
            SubjectSource(
                subject=pair.subject,
                paths={"a": str(pair.a), "b": str(pair.b)},
                checksums=checks,
                make_rows=make,
                split=pair.split,
            )
        )
    return sources


def phantom_pair(seed: int, config: PhantomConfig = PhantomConfig()) -> tuple[Volume, np.ndarray]:
    """A demo pair on one grid: the phantom's native truth (A) and its venous truth (B)."""
    native, labels = make_phantom(seed=seed, config=config)
    sim = simulate_phases(
        native,
        labels,
        seed=seed,
        phases=("native", "venous"),
        config=SimulatorConfig(semi_paired=False),
    )
    a = Volume(array=sim[NATIVE_INDEX].truth, affine=native.affine)
    return a, sim[parse_phase("venous")].truth


def _phantom_sources(count: int, window: HUWindow, opts: Pix2PixDataOptions) -> list[SubjectSource]:
    def rows(k: int, subject: str, rng: np.random.Generator, split: str):
        a, b = phantom_pair(k)
        made = slice_rows(subject, a.array, b, window=window, opts=opts, rng=rng)
        return made, _stats(a, made)

    return phantom_sources(count, rows, version=PHANTOM_VERSION)


def build(
    *,
    out: str | Path,
    inputs: str | Path | None = None,
    phantom: int = 0,
    config: BuildConfig = BuildConfig(),
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Manifest:
    """Build pix2pix slice shards from paired inputs and/or ``phantom`` demo subjects.

    ``config.patch_size`` becomes (resize_to, resize_to, 1) and ``config.spacing`` is unused
    (slices are resized, not resampled); both are recorded as such in the manifest.
    """
    opts = from_dict(Pix2PixDataOptions, options, where="pix2pix data options")
    config = dataclasses.replace(
        config, patch_size=(opts.resize_to, opts.resize_to, 1), resize_inplane=True
    )
    window = HUWindow(lo=config.window_lo, hi=config.window_hi)
    skipped: list[dict[str, str]] = []
    sources = _phantom_sources(phantom, window, opts) if phantom else []
    if inputs is not None:
        sources += _file_sources(find_pairs(Path(inputs), skipped), window, opts, skipped)
    return build_shards(
        family="pix2pix",
        out=out,
        sources=sources,
        skipped=skipped,
        config=config,
        family_options=to_dict(opts),
        progress=progress,
    )
