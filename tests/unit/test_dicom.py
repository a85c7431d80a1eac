"""DICOM CT series in: geometry, HU and the refusals, on series written from the real CT.

Each case writes a crop of ../shared/data/ct/abdomen_native.nii.gz as a DICOM series (pydicom)
and as a NIfTI with the same geometry, and checks that both load to the same voxels at the same
world coordinates. The geometry is also checked against nibabel's own DICOM code.
"""

from __future__ import annotations

import gzip
import io
import logging
import warnings
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_writer import assert_same_world, real_crop, reoriented, write_series
from pydicom.uid import JPEG2000Lossless

from ctray.data.dicom import DicomError, SeriesTooLarge, is_dicom_series, load_dicom_series
from ctray.data.nifti import NiftiError, Volume, load_nifti, save_nifti
from ctray.data.volumes import (
    is_volume,
    load_volume,
    series_nifti_bytes,
    volume_checksum,
    volume_stem,
)
from ctray.serve.errors import ApiError
from ctray.serve.handling import decode_volume


@pytest.fixture(scope="module")
def crop(real_ct_dir: Path) -> Volume:
    return real_crop(real_ct_dir)


@pytest.fixture
def series(crop: Volume, tmp_path: Path) -> Path:
    """The plain axial crop as a series (12 slices)."""
    write_series(crop, tmp_path / "series")
    return tmp_path / "series"


def _nifti_twin(vol: Volume, path: Path) -> Volume:
    save_nifti(path, vol.array, vol.affine)
    return load_nifti(path)


# --------------------------------------------------------------------------- round trips

CASES = {
    # kind, stored-value encoding, file names in reverse slice order
    "axial": (None, {"slope": 1.0, "intercept": 0.0}, False),
    "flipped": ("flipped", {"slope": 1.0, "intercept": -2048.0, "unsigned": True}, True),
    "oblique": ("oblique", {"slope": 0.5, "intercept": -2048.0, "unsigned": True}, False),
    "sagittal": ("sagittal", {"slope": 1.0, "intercept": -1024.0}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_series_round_trips_to_the_niftis_voxels_and_world(
    crop: Volume, tmp_path: Path, case: str
) -> None:
    kind, encoding, reverse_names = CASES[case]
    vol = crop if kind is None else reoriented(crop, kind)
    n = vol.shape[2]
    names = [f"IM{n - k:04d}.dcm" for k in range(n)] if reverse_names else None
    write_series(vol, tmp_path / "series", names=names, **encoding)  # SliceThickness 5 mm
    got = load_dicom_series(tmp_path / "series")
    assert got.array.dtype == np.float32
    assert got.spacing == pytest.approx(vol.spacing, abs=1e-4), "spacing from positions"
    assert_same_world(got, _nifti_twin(vol, tmp_path / "twin.nii.gz"))
    if kind != "oblique":  # the same world image as the untouched crop, too
        assert_same_world(got, crop)
    # the voxel order kept is the stored one (i along rows, j down columns); slices ascend
    # along the normal, so a flipped stack comes back in reverse slice order
    expect = vol.affine.copy()
    if kind == "flipped":
        expect[:, 2] *= -1
        expect[:, 3] = vol.affine @ np.array([0.0, 0.0, n - 1, 1.0])
    np.testing.assert_allclose(got.affine, expect, atol=1e-4)


def test_geometry_agrees_with_nibabels_dicom_code(crop: Volume, tmp_path: Path) -> None:
    """An independent oracle for the conventions (row/column order, LPS): nibabel's wrapper
    gives each file's voxel (row, column) -> LPS mapping and its scaled pixel values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "highly experimental" readers
        from nibabel.nicom.dicomwrappers import wrapper_from_data

    vol = reoriented(crop, "oblique")
    paths = write_series(vol, tmp_path / "series", slope=0.5, intercept=-2048.0, unsigned=True)
    got = load_dicom_series(tmp_path / "series")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ got.affine
    rows, cols = 5, 7
    for path in paths[::5]:
        wrapper = wrapper_from_data(pydicom.dcmread(path))
        data = wrapper.get_data()
        k = np.linalg.solve(lps[:3, :3], wrapper.affine[:3, 3] - lps[:3, 3])
        np.testing.assert_allclose(k[:2], 0.0, atol=1e-4)
        assert abs(k[2] - round(k[2])) < 1e-4
        np.testing.assert_allclose(
            wrapper.affine @ [rows, cols, 0, 1], lps @ [cols, rows, k[2], 1], atol=1e-4
        )
        np.testing.assert_array_equal(got.array[:, :, round(k[2])], data.T)


def test_zip_of_a_series_and_non_dicom_files_beside_it(
    series: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Decision: files that are not DICOM (no 'DICM' marker) are ignored and logged; a zip
    is read from any depth (zip tools add a top folder), hidden and __MACOSX entries skipped."""
    (series / "README.txt").write_text("exported by PACS")
    (series / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    with caplog.at_level(logging.WARNING, logger="ctray.data.dicom"):
        from_folder = load_dicom_series(series)
    assert "ignored 2 file(s)" in caplog.text and "README.txt" in caplog.text
    archive = tmp_path / "case7.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(series.iterdir()):
            zf.write(path, f"case7/DICOM/{path.name}")
        zf.writestr("__MACOSX/case7/._IM0000.dcm", b"junk")
    for got in (load_dicom_series(archive), load_dicom_series(archive.read_bytes())):
        np.testing.assert_array_equal(got.array, from_folder.array)
        np.testing.assert_allclose(got.affine, from_folder.affine)
    # one set of names for every input kind
    assert is_volume(series) and is_volume(archive) and is_volume(Path("x.nii.gz"))
    assert not is_volume(tmp_path) and not is_dicom_series(tmp_path)  # a folder of folders
    assert [volume_stem(p) for p in (series, archive, Path("a/b.nii.gz"))] == [
        "series",
        "case7",
        "b",
    ]
    np.testing.assert_array_equal(load_volume(archive).array, from_folder.array)


def test_checksum_follows_the_series_files(series: Path) -> None:
    before = volume_checksum(series)
    assert volume_checksum(series) == before
    first = sorted(series.glob("*.dcm"))[0]
    first.write_bytes(first.read_bytes()[:-2] + b"\x01\x02")
    assert volume_checksum(series) != before


def test_series_nifti_bytes_is_lossless(crop: Volume, tmp_path: Path) -> None:
    """What `ctray predict` uploads: int16 when the HU are whole numbers, float32 otherwise."""
    write_series(crop, tmp_path / "whole")
    half = Volume(array=crop.array + 0.5, affine=crop.affine)
    write_series(half, tmp_path / "half", slope=0.5, intercept=-2048.0, unsigned=True)
    for name, dtype in (("whole", np.int16), ("half", np.float32)):
        raw = series_nifti_bytes(tmp_path / name)
        vol = load_nifti(raw)
        assert nib.Nifti1Image.from_bytes(gzip.decompress(raw)).get_data_dtype() == dtype
        assert_same_world(vol, load_dicom_series(tmp_path / name))


# --------------------------------------------------------------------------- refusals


def _two_series(crop: Volume, folder: Path) -> None:
    write_series(crop, folder)
    scout = Volume(array=crop.array[:, :, :2].copy(), affine=crop.affine)
    write_series(scout, folder, names=["scout1.dcm", "scout2.dcm"])


def _missing_middle(crop: Volume, folder: Path) -> None:
    paths = write_series(crop, folder)
    paths[len(paths) // 2].unlink()


def _mr(crop: Volume, folder: Path) -> None:
    write_series(crop, folder, modality="MR")


def _no_pixels(crop: Volume, folder: Path) -> None:
    path = write_series(crop, folder)[3]
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)


def _same_position(crop: Volume, folder: Path) -> None:
    paths = write_series(crop, folder)
    ds = pydicom.dcmread(paths[4])
    ds.ImagePositionPatient = pydicom.dcmread(paths[3]).ImagePositionPatient
    ds.save_as(paths[4])


def _irregular(crop: Volume, folder: Path) -> None:
    paths = write_series(crop, folder)
    ds = pydicom.dcmread(paths[4])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0
    ds.save_as(paths[4])


def _tilted(crop: Volume, folder: Path) -> None:
    for k, path in enumerate(write_series(crop, folder)):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 0.5 * k
        ds.save_as(path)


def _corrupt(crop: Volume, folder: Path) -> None:
    path = write_series(crop, folder)[5]
    path.write_bytes(path.read_bytes()[:200])


def _one_slice(crop: Volume, folder: Path) -> None:
    for path in write_series(crop, folder)[1:]:
        path.unlink()


def _compressed(crop: Volume, folder: Path) -> None:
    path = write_series(crop, folder)[2]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def _only_text(crop: Volume, folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")


REFUSALS = {
    "two_series": (_two_series, ("holds 2 series", "scout1.dcm", "its own folder")),
    "missing_middle_slice": (_missing_middle, ("about 1 slice(s) missing", "6.00 mm apart")),
    "mr_modality": (_mr, ("modality 'MR', not CT",)),
    "no_pixel_data": (_no_pixels, ("IM0003.dcm: no pixel data",)),
    "same_position": (_same_position, ("same position", "IM0004.dcm")),
    "irregular_spacing": (_irregular, ("irregular slice spacing",)),
    "gantry_tilt": (_tilted, ("sideways", "gantry tilt", "dcm2niix")),
    "corrupt_file": (_corrupt, ("IM0005.dcm",)),
    "one_slice": (_one_slice, ("only one image", "at least 2 slices")),
    "compressed_without_decoder": (_compressed, ("IM0002.dcm: cannot decode", "pylibjpeg")),
    "no_dicom_files": (_only_text, ("no DICOM image files", "ignored 1 other file")),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unusable_series_are_refused_with_the_reason(
    crop: Volume, tmp_path: Path, case: str
) -> None:
    make, needles = REFUSALS[case]
    folder = tmp_path / "series"
    make(crop, folder)
    with pytest.raises(DicomError) as info:
        load_dicom_series(folder)
    message = str(info.value)
    assert message.startswith(f"{folder}: "), message
    for needle in needles:
        assert needle in message, (needle, message)
    assert isinstance(info.value, NiftiError), "reported wherever an unusable input is"


def test_size_limits_come_before_decoding(series: Path, tmp_path: Path) -> None:
    with pytest.raises(SeriesTooLarge, match="12 slices of 32x40 are 15,360 voxels"):
        load_dicom_series(series, max_voxels=10_000)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.dcm", b"\0" * (8 << 20))  # 8 MiB of zeros, 8 KiB zipped
    with pytest.raises(SeriesTooLarge, match="unpacks to 8 MiB"):
        load_dicom_series(bomb.getvalue(), max_voxels=1000)
    with pytest.raises(DicomError, match="not a readable zip"):
        load_dicom_series(b"PK\x03\x04" + b"\0" * 100)
    (tmp_path / "x.nii.gz").write_bytes(b"")
    with pytest.raises(DicomError, match=r"neither a DICOM series folder nor a \.zip"):
        load_dicom_series(tmp_path / "x.nii.gz")


def test_server_decodes_a_zipped_series_upload(series: Path) -> None:
    """The body-decoding step of `ctray serve`: a zip of a series is a volume; its problems
    are 4xx answers with the reason."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(series.iterdir()):
            zf.write(path, path.name)
    body = buf.getvalue()
    vol = decode_volume(body, max_voxels=10**6)
    np.testing.assert_array_equal(vol.array, load_dicom_series(series).array)
    with pytest.raises(ApiError) as too_large:
        decode_volume(body, max_voxels=10_000)
    assert (too_large.value.status, too_large.value.error) == (413, "volume_too_large")
    with pytest.raises(ApiError) as single:
        decode_volume((series / "IM0000.dcm").read_bytes(), max_voxels=10**6)
    assert (single.value.status, single.value.error) == (422, "invalid_dicom")
    assert "send the whole series as one .zip" in single.value.detail
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(series.iterdir()):
            if path.name != "IM0005.dcm":
                zf.write(path, path.name)
    with pytest.raises(ApiError) as gaps:
        decode_volume(buf.getvalue(), max_voxels=10**6)
    assert (gaps.value.status, gaps.value.error) == (422, "invalid_dicom")
    assert gaps.value.detail.startswith("upload: ") and "missing" in gaps.value.detail


# --------------------------------------------------------------------------- data build inputs


def test_phase_gan_builds_from_series_beside_niftis(
    crop: Volume, real_ct_dir: Path, tmp_path: Path
) -> None:
    """`ctray data build --input DIR`: a series folder is a scan (its NIfTI label map beside
    it, made on the original voxel order), a study folder may hold one series per phase."""
    from ctray.data.build import BuildConfig
    from ctray.families.phase_gan.data import build

    root = tmp_path / "in"
    seg = real_crop(real_ct_dir, "abdomen_native_seg")
    write_series(reoriented(crop, "flipped"), root / "case1")
    save_nifti(root / "case1_seg.nii.gz", seg.array, seg.affine, dtype=np.uint8)
    save_nifti(root / "case2.nii.gz", crop.array, crop.affine)
    save_nifti(root / "case2_seg.nii.gz", seg.array, seg.affine, dtype=np.uint8)
    write_series(crop, root / "study3" / "native")
    write_series(Volume(array=crop.array + 100, affine=crop.affine), root / "study3" / "venous")
    (root / "study3" / "notes.txt").write_text("not a phase")
    write_series(crop, root / "case4")  # a series without labels: skipped with the reason
    config = BuildConfig(patch_size=(8, 8, 8), spacing=(6.0, 6.0, 6.0), patches_per_subject=1)
    cheap = {"semi_paired": False, "register": False, "target_phases": ("venous",)}
    manifest = build(
        out=tmp_path / "out", inputs=root, config=config, options=cheap, progress=False
    )
    inputs = {r.subject: r for r in manifest.inputs}
    assert set(inputs) == {"case1", "case2", "study3"}
    assert inputs["case1"].paths == {
        "scan": str(root / "case1"),
        "labels": str(root / "case1_seg.nii.gz"),
    }
    assert inputs["study3"].paths == {
        "native": str(root / "study3" / "native"),
        "venous": str(root / "study3" / "venous"),
    }
    assert inputs["case1"].shape == inputs["case2"].shape, "the same scan, the same grid"
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest.skipped}
    assert reasons["case4"].startswith("no organ label map case4_seg.nii.gz")
    assert reasons["notes.txt"].startswith("not a NIfTI file (.nii or .nii.gz), a DICOM series")


def test_other_families_find_series_where_they_find_niftis(crop: Volume, tmp_path: Path) -> None:
    from ctray.families.pix2pix.data import match_folders
    from ctray.families.slice_ldm.data import find_inputs as slice_inputs
    from ctray.families.xray2ct.data import find_inputs as xray_inputs

    root = tmp_path / "in"
    write_series(crop, root / "thin1")  # a scan, not a study folder
    write_series(crop, root / "pair" / "thick")
    write_series(crop, root / "pair" / "thin")
    skipped: list[dict[str, str]] = []
    assert slice_inputs(root, skipped) == ([root / "thin1"], [root / "pair"])
    assert skipped == []

    root = tmp_path / "xray"
    write_series(crop, root / "ct1")
    write_series(crop, root / "patient2" / "ct")
    assert xray_inputs(root, ["ap", "lat"], skipped) == (
        [("ct1", root / "ct1"), ("patient2", root / "patient2" / "ct")],
        [],
    )
    assert skipped == []

    write_series(crop, tmp_path / "trainA" / "p1")
    save_nifti(tmp_path / "trainB" / "p1.nii.gz", crop.array, crop.affine)
    pairs = match_folders(tmp_path / "trainA", tmp_path / "trainB", skipped)
    assert [(p.subject, p.a, p.b) for p in pairs] == [
        ("p1", tmp_path / "trainA" / "p1", tmp_path / "trainB" / "p1.nii.gz")
    ]
    assert skipped == []
