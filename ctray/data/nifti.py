"""NIfTI I/O with validation, canonical orientation, resampling and HU windows.

Everything that enters the pipeline goes through `load_nifti`, so bad uploads fail early with a
message that names the file and says what to fix, instead of as a shape error deep in a model.
The affine is always kept next to the voxels so outputs can be written back on the input grid.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np
import torch
from nibabel import orientations as nio

from ctray.files import atomic_write_bytes

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "NIFTI_SUFFIXES",
    "HUWindow",
    "NiftiError",
    "Volume",
    "canonical_ras",
    "check_values",
    "is_nifti",
    "load_nifti",
    "nifti_bytes",
    "nifti_stem",
    "read_header_shape",
    "resample_like",
    "resample_to_spacing",
    "save_nifti",
    "undo_canonical",
]

DEFAULT_MAX_VOXELS = 400_000_000
# Voxel sizes outside this range are almost certainly a broken header, not a real scan.
MIN_SPACING_MM = 1e-2
MAX_SPACING_MM = 100.0
_GZIP_MAGIC = b"\x1f\x8b"
_HEAD_BYTES = 540  # NIfTI-2 header size; NIfTI-1 needs 348
_PathLike = str | os.PathLike


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: Path) -> bool:
    """Whether a file name is a NIfTI volume (.nii or .nii.gz)."""
    return path.name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """The name without .nii / .nii.gz (``case1.nii.gz`` -> ``case1``)."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def is_label_map(path: Path) -> bool:
    """``NAME_seg.nii[.gz]``: an organ label map beside its scan (TotalSegmentator naming)."""
    return is_nifti(path) and nifti_stem(path).endswith("_seg")


class NiftiError(ValueError):
    """An input volume that cannot be used; names the file and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, kw_only=True, eq=False)
class Volume:
    """A 3D image with its voxel->world affine (RAS+ mm, nibabel convention)."""

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        if np.ndim(self.array) != 3:
            raise ValueError(f"Volume.array must be 3D, got shape {np.shape(self.array)}")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got shape {affine.shape}")
        object.__setattr__(self, "affine", affine)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in mm (column norms of the affine's linear part)."""
        return _spacing_of(self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.array.shape
        return (int(s[0]), int(s[1]), int(s[2]))


def _spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    sp = np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))
    return (float(sp[0]), float(sp[1]), float(sp[2]))


# --------------------------------------------------------------------------- loading


def _label_for(source: _PathLike | bytes, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, bytes | bytearray | memoryview):
        return "<bytes>"
    return os.fspath(source)


def _parse_header(head: bytes, label: str) -> nib.Nifti1Header:
    """Parse a NIfTI-1/2 header from the first bytes of the (decompressed) file."""
    if len(head) < 348:
        raise NiftiError(label, f"not a NIfTI file: only {len(head)} bytes, a header needs 348")
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    if 348 in sizes:
        klass: type[nib.Nifti1Header] = nib.Nifti1Header
        head = head[:348]  # header only: extensions are not needed for validation
    elif 540 in sizes and len(head) >= 540:
        klass = nib.Nifti2Header
        head = head[:540]
    else:
        raise NiftiError(label, "not a NIfTI file (no NIfTI-1/NIfTI-2 header found)")
    try:
        hdr = klass.from_fileobj(io.BytesIO(head), check=False)
        magic = bytes(hdr["magic"]).rstrip(b"\x00")
    except Exception as exc:  # nibabel raises several types for garbage headers
        raise NiftiError(label, f"not a readable NIfTI header ({exc})") from exc
    if magic == b"ni1" or magic == b"ni2":
        raise NiftiError(
            label, "NIfTI header/image pairs (.hdr/.img) are not supported; save as .nii/.nii.gz"
        )
    if magic not in (b"n+1", b"n+2"):
        raise NiftiError(label, f"not a NIfTI file (bad magic {magic!r})")
    return hdr


def _raw_dims(hdr: nib.Nifti1Header, label: str) -> tuple[int, ...]:
    dim = [int(d) for d in hdr["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise NiftiError(label, f"corrupt header: dim[0]={ndim}, must be 1..7")
    dims = tuple(dim[1 : ndim + 1])
    if any(d <= 0 for d in dims):
        raise NiftiError(label, f"corrupt header: non-positive image dimensions {dims}")
    return dims


def _spatial_shape(dims: tuple[int, ...], label: str) -> tuple[int, int, int]:
    """Squeeze trailing singleton dims and insist on a real 3D volume."""
    shape = list(dims)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) > 3:
        extra = math.prod(shape[3:])
        raise NiftiError(
            label,
            f"has {extra} volumes (shape {dims}); need a single 3D volume — "
            "split the series and upload one volume",
        )
    if len(shape) < 3 or min(shape) < 2:
        raise NiftiError(label, f"is 2D (shape {dims}); need a 3D volume with >= 2 slices per axis")
    return (shape[0], shape[1], shape[2])


def _check_header(
    hdr: nib.Nifti1Header, label: str, max_voxels: int
) -> tuple[tuple[int, int, int], int]:
    """Validate everything knowable from the header; return (3D shape, bytes the file needs)."""
    dims = _raw_dims(hdr, label)
    n_vox = math.prod(dims)
    if n_vox > max_voxels:
        raise NiftiError(
            label,
            f"header claims {n_vox:,} voxels (shape {dims}), more than the limit of "
            f"{max_voxels:,}; crop/downsample the volume or raise max_voxels",
        )
    shape = _spatial_shape(dims, label)
    try:
        itemsize = hdr.get_data_dtype().itemsize
    except Exception as exc:
        raise NiftiError(label, f"unsupported voxel data type ({exc})") from exc
    try:
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except Exception as exc:
        raise NiftiError(label, f"corrupt orientation in header ({exc})") from exc
    if not np.all(np.isfinite(affine)):
        raise NiftiError(label, "affine contains NaN/inf; fix the qform/sform in the header")
    spacing = _spacing_of(affine)
    if any(not (MIN_SPACING_MM <= s <= MAX_SPACING_MM) for s in spacing):
        raise NiftiError(
            label,
            f"implausible voxel spacing {tuple(round(s, 6) for s in spacing)} mm; "
            f"each must be in [{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm — fix pixdim/sform",
        )
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise NiftiError(label, "degenerate affine (voxel axes are not independent)")
    offset = int(hdr["vox_offset"])
    return shape, max(offset, hdr.sizeof_hdr) + n_vox * itemsize


def _gunzip_prefix(data: bytes, limit: int, label: str) -> bytes:
    """Decompress at most `limit` bytes of a (possibly multi-member) gzip stream.

    Reading stops at `limit`, so a decompression bomb cannot allocate more than the header
    promised; a stream that ends early yields fewer bytes and the caller reports truncation.
    """
    out: list[bytes] = []
    total = 0
    buf = data
    try:
        while buf and total < limit:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            chunk = d.decompress(buf, limit - total)
            out.append(chunk)
            total += len(chunk)
            if not d.eof:
                break
            buf = d.unused_data
            if buf[:2] != _GZIP_MAGIC:
                break
    except zlib.error as exc:
        raise NiftiError(label, f"corrupt gzip data ({exc}); re-export or re-upload") from exc
    return b"".join(out)


def _read_head(source: _PathLike | bytes, label: str) -> tuple[bytes, bool]:
    """First header bytes of a file or buffer (decompressed), and whether it is gzip."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source[: 1 << 20]) if len(source) > (1 << 20) else bytes(source)
        if data[:2] != _GZIP_MAGIC:
            return data[:_HEAD_BYTES], False
        head = _gunzip_prefix(data, _HEAD_BYTES, label)
        if len(head) < 348:
            raise NiftiError(
                label, f"truncated gzip data: only {len(head)} bytes decompress (header needs 348)"
            )
        return head, True
    path = Path(source)
    if not path.exists():
        raise NiftiError(label, "file not found")
    if path.is_dir():
        raise NiftiError(label, "is a directory, expected a .nii or .nii.gz file")
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == _GZIP_MAGIC
        if gz:
            with gzip.open(path, "rb") as f:
                return f.read(_HEAD_BYTES), True
        with open(path, "rb") as f:
            return f.read(_HEAD_BYTES), False
    except (OSError, EOFError, zlib.error) as exc:
        raise NiftiError(label, f"unreadable or corrupt gzip file ({exc})") from exc


def _validated_header(
    source: _PathLike | bytes, label: str, max_voxels: int
) -> tuple[nib.Nifti1Header, tuple[int, int, int], int, bool]:
    head, gz = _read_head(source, label)
    hdr = _parse_header(head, label)
    shape, needed = _check_header(hdr, label, max_voxels)
    return hdr, shape, needed, gz


def read_header_shape(
    source: _PathLike | bytes,
    *,
    name: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> tuple[int, int, int]:
    """3D shape from the header alone (cheap; for planning and fingerprints)."""
    label = _label_for(source, name)
    _, shape, _, _ = _validated_header(source, label, max_voxels)
    return shape


def load_nifti(
    source: _PathLike | bytes,
    *,
    name: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    dtype: Any = np.float32,
) -> Volume:
    """Load and validate a 3D NIfTI (file path or in-memory bytes, gzip or not).

    The header is checked before any voxel data is read, so a crafted header claiming a huge
    volume is rejected without allocating it.

    Args:
        source: path to a .nii/.nii.gz file, or the file's bytes (e.g. an HTTP upload).
        name: label used in error messages (defaults to the path, or "<bytes>").
        max_voxels: refuse volumes whose header claims more voxels than this.
        dtype: dtype of the returned array (scaling from scl_slope/scl_inter is applied).

    Raises:
        NiftiError: naming the file and the reason it cannot be used.
    """
    label = _label_for(source, name)
    hdr, shape, needed, gz = _validated_header(source, label, max_voxels)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise NiftiError(label, f"cannot read file ({exc})") from exc
    raw = _gunzip_prefix(data, needed, label) if gz else data[:needed]
    if len(raw) < needed:
        what = "gzip stream" if gz else "file"
        raise NiftiError(
            label,
            f"truncated: the {what} ends after {len(raw):,} of {needed:,} bytes "
            "(incomplete download/upload?)",
        )
    klass = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
    try:
        img = klass.from_bytes(raw)
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # corrupt payloads surface as many exception types
        raise NiftiError(label, f"could not read voxel data ({exc})") from exc
    arr = np.asarray(arr).reshape(shape)
    check_values(arr, label)
    out_dtype = np.dtype(dtype)
    if np.issubdtype(out_dtype, np.integer) and not np.issubdtype(arr.dtype, np.integer):
        arr = np.rint(arr)
    return Volume(array=np.ascontiguousarray(arr, dtype=out_dtype), affine=img.affine)


def check_values(arr: np.ndarray, label: str) -> None:
    """Refuse NaN/inf and constant volumes (shared by every input format)."""
    if np.issubdtype(arr.dtype, np.inexact):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise NiftiError(
                label, f"contains {bad:,} NaN/inf voxel values; fill or mask them before upload"
            )
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        raise NiftiError(label, f"constant volume (every voxel is {lo}); nothing to translate")


# --------------------------------------------------------------------------- saving


def _prepare_array(array: np.ndarray | torch.Tensor, dtype: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    arr = np.asarray(array)
    if dtype is None:
        return arr
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer) and not np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(dt)
        arr = np.clip(np.rint(arr), info.min, info.max)
    return arr.astype(dt, copy=False)


def nifti_bytes(
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray,
    *,
    dtype: Any = np.int16,
    compress: bool = True,
) -> bytes:
    """Serialise a volume to .nii.gz bytes (or plain .nii with compress=False).

    Args:
        array: 3D voxel array in (i, j, k) order.
        affine: 4x4 voxel->world affine written to both qform and sform.
        dtype: on-disk dtype; integer dtypes round and clip (HU fits int16). None keeps it.
        compress: gzip the result.
    """
    arr = _prepare_array(array, dtype)
    aff = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(arr, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_xyzt_units("mm", "sec")
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


def save_nifti(
    path: _PathLike,
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray,
    *,
    dtype: Any = np.int16,
) -> Path:
    """Write a NIfTI atomically (temp file in the same dir, then rename).

    Readers never see a half-written file, even if the process dies mid-write. The file is
    gzip-compressed when the name ends in .gz.
    """
    path = Path(path)
    data = nifti_bytes(array, affine, dtype=dtype, compress=path.name.endswith(".gz"))
    return atomic_write_bytes(path, data)


# --------------------------------------------------------------------------- geometry


def canonical_ras(vol: Volume) -> tuple[Volume, np.ndarray]:
    """Reorient to the closest RAS voxel order by axis permutation/flips only (no interpolation).

    Returns the reoriented volume and the nibabel orientation transform that was applied; pass it
    to `undo_canonical` to restore the original voxel order exactly.
    """
    src = nio.io_orientation(vol.affine)
    ornt = nio.ornt_transform(src, nio.axcodes2ornt(("R", "A", "S")))
    arr = np.ascontiguousarray(nio.apply_orientation(vol.array, ornt))
    affine = vol.affine @ nio.inv_ornt_aff(ornt, vol.shape)
    return Volume(array=arr, affine=affine), ornt


def undo_canonical(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Inverse of `canonical_ras` on a same-shape array (e.g. a model output)."""
    ornt = np.asarray(ornt)
    inverse = np.empty_like(ornt)
    for src_axis, (dst_axis, flip) in enumerate(ornt):
        inverse[int(dst_axis)] = (src_axis, flip)
    return np.ascontiguousarray(nio.apply_orientation(array, inverse))


def _as_metatensor(array: np.ndarray, affine: np.ndarray) -> Any:
    from monai.data import MetaTensor

    t = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32))[None]
    return MetaTensor(t, affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)))


def _restore_dtype(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    if np.issubdtype(like.dtype, np.integer):
        return np.rint(out).astype(like.dtype)
    return out.astype(np.float32, copy=False)


def resample_to_spacing(vol: Volume, spacing: Sequence[float], *, mode: str = "bilinear") -> Volume:
    """Resample to the given voxel spacing (mm) with MONAI `Spacing`, keeping the world extent.

    Args:
        vol: input volume.
        spacing: target voxel size per axis in mm.
        mode: "bilinear" for images, "nearest" for label maps (integer dtypes are kept).
    """
    from monai.transforms import Spacing

    out = Spacing(pixdim=tuple(float(s) for s in spacing), mode=mode, padding_mode="border")(
        _as_metatensor(vol.array, vol.affine)
    )
    arr = _restore_dtype(out[0].detach().cpu().numpy(), vol.array)
    return Volume(array=np.ascontiguousarray(arr), affine=out.affine.detach().cpu().numpy())


def resample_like(
    array: np.ndarray,
    affine: np.ndarray,
    *,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
    mode: str = "bilinear",
) -> np.ndarray:
    """Put a volume onto another voxel grid (e.g. undo `resample_to_spacing`)."""
    from monai.transforms import SpatialResample

    out = SpatialResample(mode=mode, padding_mode="border")(
        _as_metatensor(array, affine),
        dst_affine=torch.as_tensor(np.asarray(target_affine, dtype=np.float64)),
        spatial_size=tuple(int(s) for s in target_shape),
    )
    return np.ascontiguousarray(_restore_dtype(out[0].detach().cpu().numpy(), np.asarray(array)))


# --------------------------------------------------------------------------- intensities

_T = TypeVar("_T", np.ndarray, torch.Tensor)


@dataclass(frozen=True, kw_only=True)
class HUWindow:
    """HU window mapped to [0, 1]; stored with every model/metric so it is never implicit.

    Same semantics as MONAI `ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0, b_max=1, clip=True)`
    but returns the input's own type (numpy stays numpy, tensors stay plain tensors).
    """

    lo: float = -1000.0
    hi: float = 1000.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or self.hi <= self.lo:
            raise ValueError(f"HUWindow needs finite lo < hi, got lo={self.lo}, hi={self.hi}")

    @property
    def width(self) -> float:
        return float(self.hi - self.lo)

    def normalise(self, hu: _T) -> _T:
        """Clip to [lo, hi] and scale to [0, 1]."""
        if isinstance(hu, torch.Tensor):
            return (hu.clamp(self.lo, self.hi) - self.lo) / self.width
        hu = np.asarray(hu)
        dt = hu.dtype if np.issubdtype(hu.dtype, np.floating) else np.float32
        return ((np.clip(hu, self.lo, self.hi) - self.lo) / self.width).astype(dt, copy=False)

    def denormalise(self, x: _T) -> _T:
        """Map [0, 1] back to HU (no clipping, so out-of-range predictions stay visible)."""
        if isinstance(x, torch.Tensor):
            return x * self.width + self.lo
        x = np.asarray(x)
        dt = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
        return (x * self.width + self.lo).astype(dt, copy=False)

    def as_dict(self) -> dict[str, float]:
        return {"lo": float(self.lo), "hi": float(self.hi)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HUWindow:
        return cls(lo=float(d["lo"]), hi=float(d["hi"]))
