"""DICOM CT series -> :class:`Volume` (Hounsfield units, RAS affine), so a scanner's export is
accepted wherever a NIfTI volume is.

pydicom parses the files; the geometry is computed here from the image plane attributes, the
way the standard defines them (PS3.3 C.7.6.2):

* in-plane axes from ImageOrientationPatient (row and column direction cosines) and
  PixelSpacing (row spacing, column spacing);
* slices sorted by their ImagePositionPatient projected on the slice normal, and the slice
  spacing taken from those positions (never from SliceThickness, which is the reconstructed
  slab width and often differs from the spacing);
* voxel values through the modality LUT (RescaleSlope / RescaleIntercept) to HU;
* DICOM patient coordinates are LPS, nibabel's are RAS: x and y are negated.

The voxel order kept is the stored one: i along a row (columns), j down the image (rows), k
along the slice normal. Nothing is resampled.

What is a series: the DICOM files directly inside one folder, or every member of a .zip (at any
depth). Files without the DICOM Part 10 marker ("DICM" after the 128-byte preamble) are ignored
and logged, as are DICOMDIR index files and hidden files, so README files and thumbnails beside
the slices do no harm; a corrupt file that does carry the marker is an error, never skipped (a
lost slice would otherwise silently shorten the volume). Every other problem (several series,
missing or duplicate slices, a modality other than CT, no pixel data, multi-frame images,
gantry tilt) raises :class:`DicomError` naming the series, the file and the fix.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ctray.data.nifti import (
    DEFAULT_MAX_VOXELS,
    MAX_SPACING_MM,
    MIN_SPACING_MM,
    NiftiError,
    Volume,
    check_values,
)

__all__ = [
    "DicomError",
    "SeriesTooLarge",
    "has_dicom_marker",
    "is_dicom_series",
    "is_zip",
    "load_dicom_series",
    "series_checksum",
]

log = logging.getLogger(__name__)

_MARKER = b"DICM"
_PREAMBLE = 128
_ZIP_MAGIC = b"PK\x03\x04"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# More files than any CT series has (thin-slice whole-body scans have a few thousand).
MAX_FILES = 20_000
# Decompressed bytes a zip may hold per allowed voxel (int16 pixels plus generous headers).
ZIP_BYTES_PER_VOXEL = 4
ZIP_BYTES_SLACK = 1 << 20
# Slices closer than this along the normal are "the same position".
SAME_POSITION_MM = 1e-3
# A slice step this far (relative) from the typical one makes the grid irregular.
STEP_RTOL = 0.05
# Direction cosines: unit length and orthogonality within this.
COSINE_TOL = 1e-2
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_PathLike = str | os.PathLike


class DicomError(NiftiError):
    """A DICOM series that cannot be used; names the series (and file) and the reason.

    A NiftiError subclass so that everything that reports an unusable input volume (skipped
    inputs in data builds, the server's 4xx answers, the CLI's one-line errors) reports it too.
    """


class SeriesTooLarge(DicomError):
    """The series (or the zip holding it) is over the caller's voxel limit."""


@dataclass(frozen=True, kw_only=True, eq=False)
class _Slice:
    """One image of the series with its plane geometry, validated."""

    name: str
    ds: Any  # pydicom FileDataset
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient: row cosines, column cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    rows: int
    columns: int


# --------------------------------------------------------------------------- discovery


def has_dicom_marker(head: bytes) -> bool:
    """Whether bytes start like a DICOM Part 10 file ('DICM' after the 128-byte preamble)."""
    return head[_PREAMBLE : _PREAMBLE + 4] == _MARKER


def _hidden(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts if p)


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return has_dicom_marker(fh.read(_PREAMBLE + 4))
    except OSError:
        return False


def _folder_entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not _hidden(p.name))


def is_dicom_series(path: Path) -> bool:
    """A folder with at least one DICOM file directly inside (sub-folders are not searched)."""
    return path.is_dir() and any(_is_dicom_file(p) for p in _folder_entries(path))


def is_zip(data: bytes) -> bool:
    """Whether bytes (e.g. an HTTP upload) are a zip archive."""
    return data[:4] == _ZIP_MAGIC


def series_checksum(folder: Path) -> str:
    """Content checksum of a series folder (file names and bytes, in name order), so a re-run
    of a data build rebuilds a series exactly when one of its files changed."""
    digest = hashlib.sha256()
    for path in _folder_entries(folder):
        digest.update(path.name.encode() + b"\x00")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        digest.update(b"\x00")
    return digest.hexdigest()


# --------------------------------------------------------------------------- reading files


def _folder_files(folder: Path, label: str) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(name, bytes) of the DICOM files in ``folder``, and the names of the ignored files."""
    files, ignored = [], []
    for path in _folder_entries(folder):
        if not _is_dicom_file(path):
            ignored.append(path.name)
            continue
        try:
            files.append((path.name, path.read_bytes()))
        except OSError as err:
            raise DicomError(label, f"{path.name}: cannot read ({err})") from err
    return files, ignored


def _zip_files(
    source: Path | BinaryIO, label: str, max_bytes: int
) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(member, bytes) of the DICOM members of a zip, read in memory with bounded sizes.

    Declared sizes are checked before anything is decompressed, and each member is read at most
    one byte past its declared size, so a zip bomb (or a lying header) stops at the limit.
    """
    try:
        with zipfile.ZipFile(source) as archive:
            members = [m for m in archive.infolist() if not m.is_dir() and not _hidden(m.filename)]
            if len(members) > MAX_FILES:
                raise SeriesTooLarge(
                    label, f"zip holds {len(members):,} files, more than the {MAX_FILES:,} allowed"
                )
            declared = sum(m.file_size for m in members)
            if declared > max_bytes:
                raise SeriesTooLarge(
                    label,
                    f"zip unpacks to {declared / 2**20:,.0f} MiB, over the limit of "
                    f"{max_bytes / 2**20:,.0f} MiB for the allowed number of voxels",
                )
            files, ignored = [], []
            for member in members:
                with archive.open(member) as fh:
                    head = fh.read(_PREAMBLE + 4)
                    if not has_dicom_marker(head):
                        ignored.append(member.filename)
                        continue
                    data = head + fh.read(max(0, member.file_size - len(head)) + 1)
                if len(data) > member.file_size:
                    raise DicomError(
                        label, f"{member.filename}: unpacks to more bytes than the zip declares"
                    )
                files.append((member.filename, data))
    except DicomError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as err:
        raise DicomError(label, f"not a readable zip file ({err})") from err
    except (RuntimeError, NotImplementedError) as err:  # encrypted, unknown compression
        raise DicomError(label, f"cannot unpack the zip ({err})") from err
    return files, ignored


# --------------------------------------------------------------------------- parsing


def _parse(name: str, data: bytes, label: str) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as err:
        raise DicomError(label, f"{name}: corrupt DICOM file ({err})") from err


def _sop_class(ds: Any) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else ""))


def _floats(ds: Any, keyword: str, count: int, name: str, label: str) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise DicomError(label, f"{name}: no {keyword}; cannot place the slice in space")
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DicomError(label, f"{name}: unreadable {keyword} {value!r}") from err
    if out.shape != (count,) or not np.all(np.isfinite(out)):
        raise DicomError(label, f"{name}: {keyword} must be {count} finite numbers, got {value!r}")
    return out


def _slice(name: str, ds: Any, label: str) -> _Slice:
    """Per-file checks: a single-frame grey image with pixel data and plane geometry."""
    if "PixelData" not in ds:
        raise DicomError(
            label,
            f"{name}: no pixel data (a header-only file, report or presentation state?); "
            "export the images of the series",
        )
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomError(
            label,
            f"{name}: a multi-frame (enhanced) image with {frames} frames; export the series as "
            "single-frame slices (classic CT Image Storage)",
        )
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples != 1:
        raise DicomError(label, f"{name}: a colour image ({samples} samples per pixel), not CT")
    orientation = _floats(ds, "ImageOrientationPatient", 6, name, label)
    row, col = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1) > COSINE_TOL
        or abs(np.linalg.norm(col) - 1) > COSINE_TOL
        or abs(float(row @ col)) > COSINE_TOL
    ):
        raise DicomError(
            label,
            f"{name}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal "
            "unit vectors",
        )
    spacing = _floats(ds, "PixelSpacing", 2, name, label)
    if any(not (MIN_SPACING_MM <= s <= MAX_SPACING_MM) for s in spacing):
        raise DicomError(label, f"{name}: implausible PixelSpacing {spacing.tolist()} mm")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows < 2 or columns < 2:
        raise DicomError(label, f"{name}: image is {rows}x{columns} pixels")
    return _Slice(
        name=name,
        ds=ds,
        position=_floats(ds, "ImagePositionPatient", 3, name, label),
        orientation=np.concatenate([row / np.linalg.norm(row), col / np.linalg.norm(col)]),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=rows,
        columns=columns,
    )


def _one_series(datasets: list[tuple[str, Any]], label: str) -> None:
    """Refuse a folder that mixes series: their slices would interleave into nonsense."""
    groups: dict[str, list[tuple[str, Any]]] = {}
    for name, ds in datasets:
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            raise DicomError(label, f"{name}: no SeriesInstanceUID; cannot tell its series")
        groups.setdefault(str(uid), []).append((name, ds))
    if len(groups) > 1:
        described = "; ".join(
            f"{uid} ({members[0][1].get('Modality', '?')}, "
            f"{str(members[0][1].get('SeriesDescription', '')).strip() or 'no description'!r}, "
            f"{len(members)} file(s), e.g. {members[0][0]})"
            for uid, members in groups.items()
        )
        raise DicomError(
            label,
            f"holds {len(groups)} series: {described}; put each series in its own folder "
            "(or zip) and pass the CT series you mean",
        )


def _check_ct(datasets: list[tuple[str, Any]], label: str) -> None:
    for name, ds in datasets:
        modality = str(ds.get("Modality", "")).strip()
        if modality != "CT":
            what = f"modality {modality!r}" if modality else "no Modality"
            raise DicomError(
                label,
                f"{name}: {what}, not CT; ctray's models take CT in Hounsfield units",
            )


def _consistent(slices: list[_Slice], label: str) -> None:
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise DicomError(
                label,
                f"{s.name} is {s.rows}x{s.columns} pixels but {first.name} is "
                f"{first.rows}x{first.columns}; a series has one image size",
            )
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-3):
            raise DicomError(
                label,
                f"{s.name} has PixelSpacing {list(s.pixel_spacing)} but {first.name} "
                f"{list(first.pixel_spacing)}; a series has one pixel spacing",
            )
        if not np.allclose(s.orientation, first.orientation, atol=1e-3):
            raise DicomError(
                label,
                f"{s.name} and {first.name} have different ImageOrientationPatient; "
                "the slices do not form one stack",
            )


# --------------------------------------------------------------------------- geometry


def _geometry(slices: list[_Slice], label: str) -> tuple[np.ndarray, np.ndarray]:
    """Slice order along the normal, and the RAS voxel->world affine of the stacked volume."""
    if len(slices) < 2:
        raise DicomError(
            label, f"only one image ({slices[0].name}); a 3D volume needs at least 2 slices"
        )
    first = slices[0]
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    positions = np.stack([s.position for s in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    names = [slices[i].name for i in order]
    steps = np.diff(along)
    same = np.flatnonzero(steps < SAME_POSITION_MM)
    if same.size:
        k = int(same[0])
        raise DicomError(
            label,
            f"{names[k]} and {names[k + 1]} are at the same position ({along[k]:.2f} mm along "
            f"the slice normal; {same.size} such pair(s)): several acquisitions, echoes or "
            "reconstructions in one series? keep one of them",
        )
    typical = float(np.median(steps))
    ratio = steps / typical
    gaps = np.flatnonzero(ratio > 1.5)
    if gaps.size:
        k = int(gaps[0])
        missing = max(1, round(float(ratio[k])) - 1)
        raise DicomError(
            label,
            f"about {missing} slice(s) missing between {names[k]} and {names[k + 1]}: they are "
            f"{steps[k]:.2f} mm apart, the other slices {typical:.2f} mm ({gaps.size} gap(s) in "
            f"{len(slices)} slices); re-export the complete series",
        )
    if np.any(np.abs(ratio - 1) > STEP_RTOL):
        raise DicomError(
            label,
            f"irregular slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm "
            "between consecutive slices; a volume needs one spacing",
        )
    spacing = float(along[-1] - along[0]) / (len(slices) - 1)
    if not MIN_SPACING_MM <= spacing <= MAX_SPACING_MM:
        raise DicomError(label, f"implausible slice spacing {spacing:.4f} mm from the positions")
    drift = (positions - positions[0]) - np.outer(along - along[0], normal)
    shift = float(np.linalg.norm(drift, axis=1).max())
    if shift > 0.5 * min(first.pixel_spacing):
        tilt = math.degrees(math.atan2(shift, float(along[-1] - along[0])))
        raise DicomError(
            label,
            f"slice positions move {shift:.2f} mm sideways along the stack (gantry tilt of "
            f"about {tilt:.1f} degrees?); ctray reads slices stacked along their normal only: "
            "convert with dcm2niix (which corrects tilt) and pass the NIfTI",
        )
    lps = np.eye(4)
    lps[:3, 0] = row * first.pixel_spacing[1]  # i: along a row, one column to the next
    lps[:3, 1] = col * first.pixel_spacing[0]  # j: down a column, one row to the next
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = positions[0]
    return order, _LPS_TO_RAS @ lps


def _hounsfield(s: _Slice, label: str) -> np.ndarray:
    """The slice in HU (modality LUT: RescaleSlope/Intercept), as (columns, rows)."""
    from pydicom.pixels import apply_modality_lut

    try:
        raw = s.ds.pixel_array
    except Exception as err:  # decoders raise many types; the message says which plugin is missing
        syntax = getattr(getattr(s.ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = (
            f"; the pixels are compressed ({syntax.name}): install a pydicom decoder "
            "(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg) or decompress the "
            "series (gdcmconv --raw)"
            if syntax is not None and syntax.is_compressed
            else ""
        )
        raise DicomError(label, f"{s.name}: cannot decode the pixel data ({err}){hint}") from err
    if raw.shape != (s.rows, s.columns):
        raise DicomError(
            label, f"{s.name}: pixel data has shape {raw.shape}, header says {s.rows}x{s.columns}"
        )
    try:
        hu = apply_modality_lut(raw, s.ds)
    except Exception as err:
        raise DicomError(label, f"{s.name}: cannot apply the rescale to HU ({err})") from err
    return np.asarray(hu).T


def _assemble(
    files: Sequence[tuple[str, bytes]],
    ignored: list[str],
    label: str,
    max_voxels: int,
    dtype: Any,
) -> Volume:
    datasets = []
    for name, data in files:
        ds = _parse(name, data, label)
        if _sop_class(ds) == DICOMDIR_SOP_CLASS:
            ignored.append(name)
            continue
        datasets.append((name, ds))
    if ignored:
        shown = ", ".join(ignored[:3]) + (", ..." if len(ignored) > 3 else "")
        log.warning(
            "%s: ignored %d file(s) that are not DICOM images: %s", label, len(ignored), shown
        )
    if not datasets:
        raise DicomError(
            label,
            "no DICOM image files found (DICOM files carry 'DICM' after a 128-byte preamble)"
            + (f"; ignored {len(ignored)} other file(s)" if ignored else ""),
        )
    _one_series(datasets, label)
    _check_ct(datasets, label)
    slices = [_slice(name, ds, label) for name, ds in datasets]
    _consistent(slices, label)
    voxels = slices[0].rows * slices[0].columns * len(slices)
    if voxels > max_voxels:
        raise SeriesTooLarge(
            label,
            f"{len(slices)} slices of {slices[0].rows}x{slices[0].columns} are {voxels:,} "
            f"voxels, over the limit of {max_voxels:,}; crop or downsample the series",
        )
    order, affine = _geometry(slices, label)
    out_dtype = np.dtype(dtype)
    array = np.empty((slices[0].columns, slices[0].rows, len(slices)), dtype=out_dtype)
    for k, index in enumerate(order):
        hu = _hounsfield(slices[index], label)
        array[:, :, k] = np.rint(hu) if np.issubdtype(out_dtype, np.integer) else hu
    check_values(array, label)
    return Volume(array=array, affine=affine)


def load_dicom_series(
    source: _PathLike | bytes,
    *,
    name: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    dtype: Any = np.float32,
) -> Volume:
    """Load one CT series (a folder, a .zip file, or a zip's bytes) as a Volume in HU.

    Args:
        source: a folder holding the series' files, a .zip of them, or the zip's bytes.
        name: label used in error messages (defaults to the path, or "<bytes>").
        max_voxels: refuse series with more voxels than this (checked before decoding pixels;
            a zip may also unpack to at most about 4 bytes per allowed voxel).
        dtype: dtype of the returned array (values are HU after RescaleSlope/Intercept).

    Raises:
        DicomError: naming the series, the file at fault and the reason (SeriesTooLarge when
            over the limits).
    """
    max_bytes = ZIP_BYTES_PER_VOXEL * max_voxels + ZIP_BYTES_SLACK
    if isinstance(source, bytes | bytearray | memoryview):
        label = name or "<bytes>"
        files, ignored = _zip_files(io.BytesIO(bytes(source)), label, max_bytes)
    else:
        path = Path(source)
        label = name or os.fspath(source)
        if path.is_dir():
            files, ignored = _folder_files(path, label)
        elif not path.exists():
            raise DicomError(label, "not found")
        elif zipfile.is_zipfile(path):
            files, ignored = _zip_files(path, label, max_bytes)
        else:
            raise DicomError(label, "neither a DICOM series folder nor a .zip of one")
    return _assemble(files, ignored, label, max_voxels, dtype)
