"""Every 3D input a user may hand ctray, behind one set of names: a NIfTI file (.nii,
.nii.gz), a DICOM series folder, or a .zip of a series.

Data builds and the predict client find and load inputs through these functions, so wherever
a NIfTI volume is accepted a DICOM series is too, with the same validation and the same
error type (a DICOM problem is a NiftiError subclass). Outputs are always NIfTI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ctray.data.dicom import is_dicom_series, load_dicom_series, series_checksum
from ctray.data.nifti import (
    DEFAULT_MAX_VOXELS,
    Volume,
    is_nifti,
    load_nifti,
    nifti_bytes,
    nifti_stem,
)
from ctray.data.shards import sha256_file

__all__ = [
    "VOLUME_FORMATS",
    "is_volume",
    "load_volume",
    "series_nifti_bytes",
    "volume_checksum",
    "volume_stem",
]

VOLUME_FORMATS = "a NIfTI file (.nii or .nii.gz), a DICOM series folder or a .zip of one"
_ZIP = ".zip"


def _is_zip_name(path: Path) -> bool:
    return path.name.lower().endswith(_ZIP)


def is_volume(path: Path) -> bool:
    """A NIfTI file name, a .zip file name (taken to hold a series), or a DICOM series folder.

    Hidden entries never count. Folders are DICOM series only if DICOM files lie directly in
    them, so a study folder of NIfTI files (or of series sub-folders) is not one.
    """
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return is_dicom_series(path)
    return is_nifti(path) or _is_zip_name(path)


def volume_stem(path: Path) -> str:
    """The subject name: ``case1.nii.gz``, ``case1.zip`` and the folder ``case1/`` -> ``case1``."""
    if is_nifti(path):
        return nifti_stem(path)
    if _is_zip_name(path) and not path.is_dir():
        return path.name[: -len(_ZIP)]
    return path.name


def load_volume(
    path: str | os.PathLike,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    dtype: Any = np.float32,
) -> Volume:
    """Load and validate any supported input (NIfTI file, series folder or zip) as a Volume.

    Raises:
        NiftiError: naming the input and the reason (a DicomError for DICOM inputs).
    """
    path = Path(path)
    if path.is_dir() or _is_zip_name(path):
        return load_dicom_series(path, max_voxels=max_voxels, dtype=dtype)
    return load_nifti(path, max_voxels=max_voxels, dtype=dtype)


def volume_checksum(path: Path) -> str:
    """Content checksum of an input (a series folder: all its files), for incremental builds."""
    return series_checksum(path) if path.is_dir() else sha256_file(path)


def series_nifti_bytes(path: str | os.PathLike, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> bytes:
    """A DICOM series (folder or zip) as .nii.gz bytes, e.g. to upload to `ctray serve`.

    int16 when every HU value is a whole number in its range (lossless, half the size of
    float32, the usual case for CT), float32 otherwise (a fractional RescaleSlope).
    """
    vol = load_dicom_series(path, max_voxels=max_voxels)
    info = np.iinfo(np.int16)
    whole = bool(np.all(np.rint(vol.array) == vol.array))
    fits = info.min <= float(vol.array.min()) and float(vol.array.max()) <= info.max
    return nifti_bytes(vol.array, vol.affine, dtype=np.int16 if whole and fits else np.float32)
