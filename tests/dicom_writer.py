"""Test helpers: write a NIfTI-style Volume as a DICOM CT series with pydicom, and compare two
volumes voxel by voxel through their world coordinates.

The writer sets the geometry from the affine (RAS -> LPS) by the standard's definitions; the
tests also check the reader against nibabel's independent DICOM geometry code, so a convention
shared by this writer and ctray's reader cannot hide a mistake.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctray.data.nifti import Volume, load_nifti

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# voxel region of ../shared/data/ct/abdomen_native.nii.gz used by the tests: body edge and air
CROP = (slice(2, 42), slice(4, 36), slice(10, 22))


def real_crop(ct_dir: Path, name: str = "abdomen_native") -> Volume:
    """A small region (40 x 32 x 12 voxels at 3 mm) of the shared real CT (HU), or of its
    label map with ``name="abdomen_native_seg"``."""
    vol = load_nifti(ct_dir / f"{name}.nii.gz", dtype=np.int16)
    start = np.array([s.start for s in CROP] + [1.0])
    affine = vol.affine.copy()
    affine[:, 3] = vol.affine @ start
    return Volume(array=np.ascontiguousarray(vol.array[CROP]), affine=affine)


def reoriented(vol: Volume, kind: str) -> Volume:
    """The same world image with another (consistent) geometry; no resampling.

    ``flipped``: every voxel axis reversed (rows, columns and slice order);
    ``oblique``: the world rotated about a skewed axis (an oblique ImageOrientationPatient),
    with non-square pixels (2.4 x 3.6 mm) and 4.5 mm slices;
    ``sagittal``: the voxel axes permuted so slices run left-right.
    """
    n = np.array(vol.shape, dtype=float)
    if kind == "flipped":
        flip = np.diag([-1.0, -1.0, -1.0, 1.0])
        flip[:3, 3] = n - 1
        return Volume(array=vol.array[::-1, ::-1, ::-1].copy(), affine=vol.affine @ flip)
    if kind == "oblique":
        axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
        angle = np.deg2rad(25.0)
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rot = np.eye(4)
        rot[:3, :3] = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
        rot[:3, 3] = [12.5, -7.25, 30.0]
        scale = np.diag([0.8, 1.2, 1.5, 1.0])
        return Volume(array=vol.array.copy(), affine=rot @ vol.affine @ scale)
    if kind == "sagittal":  # new voxel axes (j, k, i)
        perm = np.zeros((4, 4))
        perm[1, 0] = perm[2, 1] = perm[0, 2] = perm[3, 3] = 1.0
        return Volume(array=vol.array.transpose(1, 2, 0).copy(), affine=vol.affine @ perm)
    raise ValueError(kind)


def write_series(
    vol: Volume,
    folder: Path,
    *,
    series_uid: str | None = None,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = 0.0,
    unsigned: bool = False,
    thickness: float = 5.0,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """One file per slice k of ``vol``; returns the paths in k order.

    Stored value = (HU - intercept) / slope; SliceThickness is deliberately not the spacing, so
    a reader that trusts it gets the geometry wrong. ``names`` overrides the file names.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ vol.affine
    row = lps[:3, 0] / np.linalg.norm(lps[:3, 0])
    col = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    assert abs(abs(np.cross(row, col) @ lps[:3, 2]) - np.linalg.norm(lps[:3, 2])) < 1e-6, (
        "the third voxel axis must be along the slice normal"
    )
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    dtype = np.uint16 if unsigned else np.int16
    paths = []
    for k in range(vol.shape[2]):
        stored = np.rint((vol.array[:, :, k].T.astype(np.float64) - intercept) / slope)
        info = np.iinfo(dtype)
        assert stored.min() >= info.min and stored.max() <= info.max, "values do not fit"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.SeriesDescription = f"test {modality}"
        ds.PatientName = "Test^Phantom"
        ds.PatientID = "0"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps @ np.array([0.0, 0.0, k, 1.0])][:3]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{np.linalg.norm(lps[:3, 1]):.6f}", f"{np.linalg.norm(lps[:3, 0]):.6f}"]
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0 if unsigned else 1
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.PixelData = stored.astype(dtype).tobytes()
        path = folder / (names[k] if names is not None else f"IM{k:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def world_aligned(got: Volume, ref: Volume, *, atol_mm: float = 1e-3) -> np.ndarray:
    """``ref``'s voxels in ``got``'s voxel order, after checking that every voxel centre of
    ``got`` lies (through both affines) on a distinct voxel centre of ``ref``."""
    assert got.array.size == ref.array.size
    idx = np.indices(got.shape).reshape(3, -1)
    world = got.affine @ np.vstack([idx, np.ones(idx.shape[1])])
    ref_idx = np.linalg.inv(ref.affine) @ world
    rounded = np.rint(ref_idx[:3])
    spacing = np.array(ref.spacing)[:, None]
    assert np.abs((ref_idx[:3] - rounded) * spacing).max() < atol_mm, "voxel centres differ"
    r = rounded.astype(int)
    assert (r >= 0).all() and (r < np.array(ref.shape)[:, None]).all(), "outside the volume"
    assert len({tuple(c) for c in r.T}) == r.shape[1], "voxels map onto each other twice"
    return ref.array[tuple(r)].reshape(got.shape)


def assert_same_world(got: Volume, ref: Volume) -> None:
    """The same voxels at the same world coordinates (any voxel order)."""
    np.testing.assert_array_equal(got.array, world_aligned(got, ref))
