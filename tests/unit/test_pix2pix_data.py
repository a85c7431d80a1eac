"""pix2pix shard builds: pairing by name, every skip reason, B resampled onto A, splits."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctray.data.build import BuildConfig, BuildError
from ctray.data.nifti import Volume, save_nifti
from ctray.data.shards import column_numpy, load_manifest, read_split
from ctray.families.pix2pix.data import b_on_a_grid, build

OPTS = {"resize_to": 16, "min_body_fraction": 0.0}
CFG = BuildConfig(patches_per_subject=1)


def _body(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """An ellipse of soft tissue in air, with texture, in HU."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.7) ** 2 < 1
    vol = np.where(inside[..., None], 40.0, -1000.0) + rng.normal(0, 5, shape)
    return vol.astype(np.float32)


def _affine(spacing: float = 2.0, origin: tuple[float, ...] = (0.0, 0.0, 0.0)) -> np.ndarray:
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def _pair(root: Path, split: str, name: str, seed: int, shape=(20, 18, 6)) -> None:
    vol = _body(shape, seed)
    save_nifti(root / f"{split}A" / f"{name}.nii.gz", vol, _affine(), dtype=np.float32)
    save_nifti(root / f"{split}B" / f"{name}.nii.gz", vol + 30, _affine(), dtype=np.float32)


def _by_name(skipped: list[dict[str, str]]) -> dict[str, str]:
    return {f"{Path(s['path']).parent.name}/{Path(s['path']).name}": s["reason"] for s in skipped}


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for k in range(3):
        _pair(root, "train", f"p{k}", k)
    a, b = root / "trainA", root / "trainB"
    # corrupt: garbage bytes under a NIfTI name (in A), truncated gzip (in B)
    save_nifti(a / "corrupt.nii.gz", _body((20, 18, 6), 9), _affine(), dtype=np.float32)
    (b / "corrupt.nii.gz").write_bytes(gzip.compress(b"this is not a nifti file" * 40))
    save_nifti(a / "trunc.nii.gz", _body((20, 18, 6), 9), _affine(), dtype=np.float32)
    full = gzip.decompress((a / "trunc.nii.gz").read_bytes())
    (b / "trunc.nii.gz").write_bytes(gzip.compress(full[: len(full) // 2]))
    # a partner missing on either side
    save_nifti(a / "lonelyA.nii.gz", _body((20, 18, 6), 4), _affine(), dtype=np.float32)
    save_nifti(b / "lonelyB.nii.gz", _body((20, 18, 6), 5), _affine(), dtype=np.float32)
    # geometry: B shifted by 20 mm (different world extent)
    save_nifti(a / "shifted.nii.gz", _body((20, 18, 6), 6), _affine(), dtype=np.float32)
    save_nifti(b / "shifted.nii.gz", _body((20, 18, 6), 6), _affine(origin=(20, 0, 0)))
    # 2D and 4D volumes
    nib.save(nib.Nifti1Image(np.zeros((20, 18), np.float32) + 1, _affine()), a / "flat.nii.gz")
    save_nifti(b / "flat.nii.gz", _body((20, 18, 6), 7), _affine(), dtype=np.float32)
    four = np.stack([_body((20, 18, 6), 8)] * 2, axis=-1)
    nib.save(nib.Nifti1Image(four, _affine()), a / "multi.nii.gz")
    save_nifti(b / "multi.nii.gz", _body((20, 18, 6), 8), _affine(), dtype=np.float32)
    (a / "notes.txt").write_text("not an image")
    return root


def test_pairs_by_name_and_every_skip_reason(messy: Path, tmp_path: Path) -> None:
    m = build(out=tmp_path / "out", inputs=messy, config=CFG, options=OPTS, progress=False)
    assert sorted(r.subject for r in m.inputs) == ["p0", "p1", "p2"]
    reasons = _by_name(m.skipped)
    assert sorted(reasons) == sorted(
        ["trainB/corrupt.nii.gz", "trainB/trunc.nii.gz", "trainA/lonelyA.nii.gz",
         "trainB/lonelyB.nii.gz", "trainB/shifted.nii.gz", "trainA/flat.nii.gz",
         "trainA/multi.nii.gz", "trainA/notes.txt"]
    )  # fmt: skip
    assert "not a NIfTI" in reasons["trainB/corrupt.nii.gz"]
    assert "truncated" in reasons["trainB/trunc.nii.gz"]
    assert "no partner lonelyA" in reasons["trainA/lonelyA.nii.gz"]
    assert "in trainB/" in reasons["trainA/lonelyA.nii.gz"]
    assert "no partner lonelyB" in reasons["trainB/lonelyB.nii.gz"]
    assert "geometry mismatch" in reasons["trainB/shifted.nii.gz"]
    assert "2D" in reasons["trainA/flat.nii.gz"]
    assert "2 volumes" in reasons["trainA/multi.nii.gz"]
    assert "not a NIfTI" in reasons["trainA/notes.txt"]
    assert m.patch_size == [16, 16, 1] and m.build["resize_inplane"] is True
    assert m.build["family_options"]["resize_to"] == 16


def test_rows_are_windowed_slices_with_a_body_mask(messy: Path, tmp_path: Path) -> None:
    m = build(out=tmp_path / "out", inputs=messy, config=CFG, options=OPTS, progress=False)
    assert m.window == {"lo": -1000.0, "hi": 1000.0}
    table = read_split(tmp_path / "out", "train")
    a, b = column_numpy(table["a"])[0], column_numpy(table["b"])[0]
    assert a.shape == (16, 16) and a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0
    inside = column_numpy(table["labels"])[0] > 0
    assert inside.any() and not inside.all()
    # B = A + 30 HU: the window keeps HU (no per-slice rescaling)
    np.testing.assert_allclose((b - a)[inside] * 2000.0, 30.0, atol=1e-2)
    assert sorted(set(column_numpy(table["slice"]).tolist())) == list(range(6))


def test_strict_turns_a_skip_into_an_error(messy: Path, tmp_path: Path) -> None:
    strict = BuildConfig(strict=True)
    with pytest.raises(BuildError, match=r"partner|NIfTI"):
        build(out=tmp_path / "out", inputs=messy, config=strict, options=OPTS, progress=False)


def test_b_is_resampled_onto_a_when_only_spacing_differs(tmp_path: Path) -> None:
    x, y, z = np.meshgrid(np.arange(20), np.arange(16), np.arange(8), indexing="ij")
    a_arr = (x * 10.0 + y * 5.0 + z).astype(np.float32)  # linear in world coordinates
    a = Volume(array=a_arr, affine=_affine(2.0))
    # B: 4 mm voxels over the same extent (voxel edges at -1 mm), same linear field
    xb, yb, zb = np.meshgrid(np.arange(10), np.arange(8), np.arange(4), indexing="ij")
    b_arr = ((2 * xb + 0.5) * 10.0 + (2 * yb + 0.5) * 5.0 + (2 * zb + 0.5)).astype(np.float32)
    b = Volume(array=b_arr, affine=_affine(4.0, origin=(1.0, 1.0, 1.0)))
    on_a, resampled = b_on_a_grid(a, b, "b.nii.gz")
    assert resampled and on_a.shape == a.shape
    interior = (slice(2, -2), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(on_a[interior], a_arr[interior], atol=1e-3)
    same, resampled = b_on_a_grid(a, a, "a.nii.gz")
    assert not resampled and same is a.array


def test_build_records_the_resampled_b(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for k in range(2):
        _pair(root, "train", f"p{k}", k, shape=(20, 16, 8))
    coarse = _body((10, 8, 4), 1)
    save_nifti(root / "trainB" / "p1.nii.gz", coarse, _affine(4.0, (1.0, 1.0, 1.0)), dtype=None)
    m = build(out=tmp_path / "out", inputs=root, config=CFG, options=OPTS, progress=False)
    extra = {r.subject: r.extra["b_resampled"] for r in m.inputs}
    assert extra == {"p0": False, "p1": True} and m.skipped == []


def test_test_folders_are_the_validation_split(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for k in range(2):
        _pair(root, "train", f"p{k}", k)
    _pair(root, "test", "t0", 5)
    _pair(root, "test", "p0", 6)  # same name as a training pair: a leak, skipped
    m = build(out=tmp_path / "out", inputs=root, config=CFG, options=OPTS, progress=False)
    assert {r.subject: r.split for r in m.inputs} == {"p0": "train", "p1": "train", "t0": "val"}
    assert "leak" in _by_name(m.skipped)["testA/p0.nii.gz"]


def test_csv_manifest_and_subject_split(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for k in range(3):
        _pair(root, "train", f"p{k}", k)
    csv = root / "pairs.csv"
    csv.write_text(
        "a,b,split\n"
        + "".join(f"trainA/p{k}.nii.gz,trainB/p{k}.nii.gz,\n" for k in range(3))
        + "trainA/p0.nii.gz,,\n"
    )
    m = build(out=tmp_path / "out", inputs=csv, config=CFG, options=OPTS, progress=False)
    assert sorted(r.subject for r in m.inputs) == ["p0", "p1", "p2"]
    assert {r.split for r in m.inputs} == {"train", "val"}
    assert any("A without B" in s["reason"] for s in m.skipped)


def test_phantom_pairs_are_native_to_venous(tmp_path: Path) -> None:
    opts = {"resize_to": 32, "max_slices": 4}
    m = build(out=tmp_path / "out", phantom=2, config=CFG, options=opts, progress=False)
    assert m.counts == {"train": 4, "val": 4}
    table = load_manifest(tmp_path / "out")
    assert table.family == "pix2pix"
    cols = read_split(tmp_path / "out", "train")
    a, b = column_numpy(cols["a"]), column_numpy(cols["b"])
    assert (b - a).max() * 2000 > 50  # enhancing organs are brighter in the venous phase
