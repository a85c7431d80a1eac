"""NIfTI I/O: round trips, orientation, resampling, HU windows and actionable input errors."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctray.data.nifti import (
    HUWindow,
    NiftiError,
    Volume,
    canonical_ras,
    load_nifti,
    nifti_bytes,
    read_header_shape,
    resample_like,
    resample_to_spacing,
    save_nifti,
    undo_canonical,
)

REAL_CT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ct"


def _affine(spacing=(2.0, 3.0, 4.0), origin=(-10.0, 5.0, 7.0)) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def _smooth(shape=(12, 10, 8)) -> np.ndarray:
    i, j, k = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    return (200 * np.sin(2 * i) + 100 * j - 50 * k).astype(np.float32)


def _write(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(arr, _affine() if affine is None else affine), str(path))
    return path


def _expect(source, *fragments: str, name: str | None = None, **kw) -> NiftiError:
    with pytest.raises(NiftiError) as info:
        load_nifti(source, name=name, **kw)
    err = info.value
    label = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    assert str(err).startswith(f"{label}: ")
    assert err.path == label
    for frag in fragments:
        assert frag in err.reason, err.reason
    return err


def test_round_trip_keeps_array_and_affine(tmp_path: Path) -> None:
    arr = np.rint(_smooth()).astype(np.float32)
    aff = _affine()
    out = save_nifti(tmp_path / "sub" / "ct.nii.gz", arr, aff)
    assert out == tmp_path / "sub" / "ct.nii.gz"
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    vol = load_nifti(out)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, aff)
    assert vol.spacing == (2.0, 3.0, 4.0)
    assert vol.shape == (12, 10, 8)


def test_save_int16_rounds_and_clips(tmp_path: Path) -> None:
    arr = _smooth()
    arr[0, 0, 0] = 1e6
    vol = load_nifti(save_nifti(tmp_path / "a.nii", arr, _affine()))
    assert vol.array[0, 0, 0] == 32767
    np.testing.assert_array_equal(vol.array[1:], np.rint(arr[1:]))


def test_save_float_dtype_none_keeps_values(tmp_path: Path) -> None:
    arr = _smooth() + 0.25
    vol = load_nifti(save_nifti(tmp_path / "f.nii.gz", arr, _affine(), dtype=None))
    np.testing.assert_array_equal(vol.array, arr)


def test_bytes_round_trip_and_header_shape(tmp_path: Path) -> None:
    arr = np.rint(_smooth())
    data = nifti_bytes(arr, _affine())
    assert data[:2] == b"\x1f\x8b"
    vol = load_nifti(data)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, _affine())
    assert read_header_shape(data) == (12, 10, 8)
    assert read_header_shape(gzip.decompress(data)) == (12, 10, 8)


def test_trailing_singleton_dims_are_squeezed(tmp_path: Path) -> None:
    arr = _smooth()[..., None]
    vol = load_nifti(_write(tmp_path / "x.nii.gz", arr))
    assert vol.shape == (12, 10, 8)


def test_nifti2_is_supported(tmp_path: Path) -> None:
    arr = _smooth()
    path = tmp_path / "n2.nii"
    nib.save(nib.Nifti2Image(arr, _affine()), str(path))
    np.testing.assert_array_equal(load_nifti(path).array, arr)


def test_load_labels_as_integers(tmp_path: Path) -> None:
    labels = (np.arange(12 * 10 * 8).reshape(12, 10, 8) % 5).astype(np.uint8)
    vol = load_nifti(_write(tmp_path / "seg.nii.gz", labels), dtype=np.uint8)
    assert vol.array.dtype == np.uint8
    np.testing.assert_array_equal(vol.array, labels)


def test_canonical_ras_round_trip_lps_permuted() -> None:
    arr = _smooth((6, 7, 5))
    # LPS-like, axes permuted: voxel i runs inferior->superior, j right->left, k anterior->post.
    aff = np.array(
        [[0.0, -2.0, 0.0, 30.0], [0.0, 0.0, -3.0, 40.0], [4.0, 0.0, 0.0, -20.0], [0, 0, 0, 1]]
    )
    vol = Volume(array=arr, affine=aff)
    ras, ornt = canonical_ras(vol)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    assert ras.shape == (7, 5, 6)
    assert ras.spacing == (2.0, 3.0, 4.0)
    # Same voxel maps to the same world point.
    world = vol.affine @ np.array([1, 2, 3, 1.0])
    ijk = np.rint(np.linalg.inv(ras.affine) @ world).astype(int)[:3]
    assert ras.array[tuple(ijk)] == arr[1, 2, 3]
    back = undo_canonical(ras.array, ornt)
    np.testing.assert_array_equal(back, arr)


def test_canonical_ras_is_identity_for_ras() -> None:
    vol = Volume(array=_smooth(), affine=_affine())
    ras, ornt = canonical_ras(vol)
    np.testing.assert_array_equal(ras.array, vol.array)
    np.testing.assert_allclose(ras.affine, vol.affine)
    np.testing.assert_array_equal(undo_canonical(ras.array, ornt), vol.array)


def test_resample_to_spacing_and_back() -> None:
    vol = Volume(array=_smooth((16, 14, 10)), affine=_affine((2.0, 2.0, 3.0)))
    res = resample_to_spacing(vol, (1.5, 2.5, 2.0))
    assert res.spacing == pytest.approx((1.5, 2.5, 2.0))
    np.testing.assert_allclose(res.affine[:3, 3], vol.affine[:3, 3])  # same world origin
    extent = [(n - 1) * s for n, s in zip(vol.shape, vol.spacing, strict=True)]
    new_extent = [(n - 1) * s for n, s in zip(res.shape, res.spacing, strict=True)]
    assert all(ne >= e - s for ne, e, s in zip(new_extent, extent, res.spacing, strict=True))
    back = resample_like(res.array, res.affine, target_affine=vol.affine, target_shape=vol.shape)
    assert back.shape == vol.shape
    interior = (slice(1, -2),) * 3
    np.testing.assert_allclose(back[interior], vol.array[interior], atol=8.0)


def test_resample_labels_nearest_keeps_dtype_and_ids() -> None:
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[2:6, 3:8, 4:9] = 5
    labels[6:9, 1:4, 1:3] = 52
    res = resample_to_spacing(
        Volume(array=labels, affine=_affine((2, 2, 2))), (1, 1, 1), mode="nearest"
    )
    assert res.array.dtype == np.uint8
    assert set(np.unique(res.array)) == {0, 5, 52}


def test_hu_window_numpy_and_torch() -> None:
    w = HUWindow(lo=-200.0, hi=300.0)
    hu = np.array([-1000.0, -200.0, 50.0, 300.0, 2000.0], dtype=np.float32)
    x = w.normalise(hu)
    assert isinstance(x, np.ndarray)
    np.testing.assert_allclose(x, [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(w.denormalise(x), [-200.0, -200.0, 50.0, 300.0, 300.0])
    t = w.normalise(torch.from_numpy(hu))
    assert type(t) is torch.Tensor
    torch.testing.assert_close(t, torch.from_numpy(x))
    torch.testing.assert_close(w.denormalise(t), torch.from_numpy(w.denormalise(x)))
    assert HUWindow.from_dict(w.as_dict()) == w
    assert HUWindow().as_dict() == {"lo": -1000.0, "hi": 1000.0}
    with pytest.raises(ValueError):
        HUWindow(lo=10.0, hi=10.0)


# ----------------------------------------------------------------------------- invalid inputs


def test_missing_file(tmp_path: Path) -> None:
    _expect(tmp_path / "nope.nii.gz", "not found")


def test_random_bytes_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _expect(path, "not a NIfTI")


def test_truncated_gz_file(tmp_path: Path) -> None:
    good = save_nifti(tmp_path / "good.nii.gz", _smooth((40, 40, 30)) * 3, _affine())
    data = good.read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    _expect(bad, "truncated")


def test_corrupt_gzip_payload(tmp_path: Path) -> None:
    data = bytearray(nifti_bytes(_smooth((30, 30, 20)) * 3, _affine()))
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(bytes(data))
    err = _expect(path)
    assert "corrupt" in err.reason or "truncated" in err.reason


def test_2d_image(tmp_path: Path) -> None:
    _expect(_write(tmp_path / "flat.nii.gz", _smooth()[:, :, 0]), "2D", "(12, 10)")


def test_4d_with_three_volumes(tmp_path: Path) -> None:
    arr = np.stack([_smooth()] * 3, axis=-1)
    _expect(_write(tmp_path / "series.nii.gz", arr), "3 volumes", "single 3D volume")


def test_nan_values(tmp_path: Path) -> None:
    arr = _smooth()
    arr[0, 0, :3] = np.nan
    arr[1, 1, 1] = np.inf
    _expect(_write(tmp_path / "nan.nii.gz", arr), "4 NaN/inf")


def test_constant_volume(tmp_path: Path) -> None:
    _expect(_write(tmp_path / "flat3d.nii", np.full((5, 5, 5), -1000, np.int16)), "constant")


def _raw_nifti(arr: np.ndarray, pixdim: tuple[float, float, float]) -> bytes:
    """Hand-made NIfTI-1 with a qform-only geometry (nibabel refuses to write bad zooms)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(arr.shape)
    hdr.set_data_dtype(np.float32)
    hdr["pixdim"][1:4] = pixdim
    hdr["qform_code"] = 1
    hdr["sform_code"] = 0
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\x00" * 4 + arr.astype("<f4").tobytes(order="F")


@pytest.mark.parametrize("pixdim", [(0.0, 1.0, 1.0), (1.0, -0.0, 1.0), (1.0, 1.0, 5000.0)])
def test_bad_spacing(tmp_path: Path, pixdim: tuple[float, float, float]) -> None:
    path = tmp_path / "sp.nii"
    path.write_bytes(_raw_nifti(_smooth(), pixdim))
    _expect(path, "spacing")


def test_hand_made_header_loads_when_valid(tmp_path: Path) -> None:
    arr = _smooth()
    np.testing.assert_array_equal(load_nifti(_raw_nifti(arr, (1.0, 2.0, 3.0))).array, arr)


def _huge_header_bytes() -> bytes:
    """A valid NIfTI-1 header claiming 1000^3 float32 voxels, followed by a tiny body."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1000, 1000, 1000))
    hdr.set_data_dtype(np.float32)
    hdr.set_zooms((1.0, 1.0, 1.0))
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\x00" * 4 + b"\x01" * 64


def test_header_claiming_too_many_voxels_file(tmp_path: Path) -> None:
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(_huge_header_bytes()))
    start = time.perf_counter()
    _expect(path, "1,000,000,000 voxels", "max_voxels", max_voxels=400_000_000)
    assert time.perf_counter() - start < 0.5  # rejected from the header, nothing allocated


def test_header_claiming_too_many_voxels_bytes() -> None:
    for data in (_huge_header_bytes(), gzip.compress(_huge_header_bytes())):
        start = time.perf_counter()
        _expect(data, "1,000,000,000 voxels", name="upload.nii.gz")
        assert time.perf_counter() - start < 0.5


def test_small_max_voxels_is_respected(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "ok.nii.gz", _smooth(), _affine())
    _expect(path, "960 voxels", max_voxels=500)


@pytest.mark.parametrize("compressed", [True, False])
def test_invalid_bytes_inputs(compressed: bool) -> None:
    def enc(arr: np.ndarray) -> bytes:
        return nifti_bytes(arr, _affine(), dtype=np.float32, compress=compressed)

    good = enc(_smooth((30, 30, 20)) * 3)
    _expect(good[: len(good) // 2], "truncated", name="up.nii")
    _expect(np.random.default_rng(1).bytes(1000), "not a NIfTI", name="up.nii")
    _expect(enc(_smooth()[:, :, 0]), "2D", name="up.nii")
    _expect(enc(np.stack([_smooth()] * 3, -1)), "3 volumes", name="up.nii")
    nan = _smooth()
    nan[2, 2, 2] = np.nan
    _expect(enc(nan), "1 NaN/inf", name="up.nii")
    _expect(enc(np.zeros((4, 4, 4), np.float32)), "constant", name="up.nii")
    _expect(b"", "not a NIfTI")  # bytes without a name are labelled "<bytes>"
    with pytest.raises(NiftiError, match=r"^<bytes>: "):
        load_nifti(b"garbage")


def test_gzip_bytes_cut_inside_header() -> None:
    good = nifti_bytes(_smooth(), _affine())
    _expect(good[:40], "truncated", name="up.nii.gz")


@pytest.mark.skipif(
    not (REAL_CT / "abdomen_native.nii.gz").exists(),
    reason="shared real CT sample (../shared/data/ct) not available",
)
def test_real_ct_file_and_bytes_agree() -> None:
    path = REAL_CT / "abdomen_native.nii.gz"
    vol = load_nifti(path)
    assert vol.shape == (122, 101, 30)
    assert vol.spacing == (3.0, 3.0, 3.0)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(load_nifti(path.read_bytes()).array, vol.array)
