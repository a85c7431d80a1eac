"""2D projection images (X-ray views) from uploads or files: PNG, TIFF (8/16-bit, float) and 2D
NIfTI, decoded to float32 arrays with the size checked before any pixel is decoded.

Bad input raises ViewError (a ValueError) naming the view and the reason, never a traceback
from a decoder.
"""

from __future__ import annotations

import gzip
import io
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

DEFAULT_MAX_PIXELS = 16_000_000  # 4000 x 4000: larger than any clinical radiograph
FORMATS = ("png", "tiff", "nifti")
SUFFIXES = (".png", ".tif", ".tiff", ".nii", ".nii.gz")


class ViewError(ValueError):
    """A view image cannot be used; the message names it and says why."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(f"{label}: {reason}")
        self.label = label
        self.reason = reason


def sniff_format(data: bytes) -> str | None:
    """'png', 'tiff' or 'nifti' from the first bytes (gzip counts as NIfTI), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data.startswith(b"\x1f\x8b"):
        return "nifti"
    if len(data) >= 348 and int.from_bytes(data[:4], "little") in (348, 540):
        return "nifti"
    if len(data) >= 348 and int.from_bytes(data[:4], "big") in (348, 540):
        return "nifti"
    return None


def decode_view(data: bytes, *, label: str = "view", max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode one view (bytes of a PNG, TIFF or 2D NIfTI) to a 2D float32 array (rows, cols).

    Raises:
        ViewError: unknown format, truncated or corrupt file, not 2D, too many pixels, NaN/inf.
    """
    kind = sniff_format(data)
    if kind is None:
        raise ViewError(label, "not a PNG, TIFF or NIfTI image (send one of: .png .tif .nii.gz)")
    array = _nifti(data, label, max_pixels) if kind == "nifti" else _raster(data, label, max_pixels)
    if not np.isfinite(array).all():
        raise ViewError(label, "contains NaN or infinite values")
    if min(array.shape) < 8:
        raise ViewError(label, f"is {array.shape[0]}x{array.shape[1]} pixels; need at least 8x8")
    return array


def read_view(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`decode_view` of a file, labelled with its path."""
    path = Path(path)
    if not path.is_file():
        raise ViewError(str(path), "no such file")
    return decode_view(path.read_bytes(), label=str(path), max_pixels=max_pixels)


def _too_many(shape: tuple[int, ...], label: str, max_pixels: int) -> None:
    if math.prod(shape) > max_pixels:
        raise ViewError(label, f"{shape} is {math.prod(shape):,} pixels, over {max_pixels:,}")


def _raster(data: bytes, label: str, max_pixels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            _too_many((image.height, image.width), label, max_pixels)
            if getattr(image, "n_frames", 1) > 1:
                raise ViewError(label, f"has {image.n_frames} frames; send one image per view")
            if image.mode in ("RGB", "RGBA", "P", "LA", "CMYK"):
                image = image.convert("L")
            array = np.asarray(image, dtype=np.float32)
    except ViewError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ViewError(label, f"cannot decode the image ({err})") from None
    if array.ndim != 2:
        raise ViewError(label, f"decoded to shape {array.shape}; need a single-channel image")
    return array


def _gunzip(data: bytes, label: str, limit: int) -> bytes:
    """Decompress at most ``limit`` bytes (a gzip bomb stops there)."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as err:
        raise ViewError(label, f"corrupt gzip stream ({err})") from None
    if len(out) > limit:
        raise ViewError(label, f"decompresses to more than {limit:,} bytes")
    if not inflater.eof:
        raise ViewError(label, "truncated gzip stream")
    return out


def _nifti(data: bytes, label: str, max_pixels: int) -> np.ndarray:
    raw = _gunzip(data, label, 352 + 8 * max_pixels) if data.startswith(b"\x1f\x8b") else data
    try:
        image = nib.Nifti1Image.from_bytes(raw)
        shape = tuple(int(d) for d in image.header.get_data_shape())
    except Exception as err:  # nibabel raises many types for corrupt headers
        raise ViewError(label, f"not a readable NIfTI ({err})") from None
    squeezed = tuple(d for d in shape if d != 1)
    if len(squeezed) != 2:
        raise ViewError(label, f"NIfTI shape {shape} is not a 2D image")
    _too_many(squeezed, label, max_pixels)
    try:
        array = np.asarray(image.get_fdata(dtype=np.float32)).reshape(squeezed)
    except Exception as err:
        raise ViewError(label, f"truncated or unreadable NIfTI data ({err})") from None
    return array


def encode_nifti_view(array: np.ndarray) -> bytes:
    """A 2D float32 view as .nii.gz bytes (what `ctray drr` writes: no precision lost)."""
    image = nib.Nifti1Image(np.asarray(array, dtype=np.float32)[:, :, None], np.eye(4))
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
