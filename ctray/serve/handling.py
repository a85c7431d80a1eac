"""Request checks done in the ingress, before a request may join a batch.

Everything a client can get wrong is caught here and turned into an ApiError (a 4xx), so a bad
upload never reaches the model, never fails a batch it shares with others, and never costs a
replica. No Ray in this module: it is unit-tested on its own.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ctray.data.dicom import (
    DicomError,
    SeriesTooLarge,
    has_dicom_marker,
    is_zip,
    load_dicom_series,
)
from ctray.data.images import ViewError, decode_view
from ctray.data.nifti import NiftiError, Volume, load_nifti, nifti_bytes, read_header_shape
from ctray.registry import DataInfo, FamilySpec
from ctray.serve.admission import working_voxels
from ctray.serve.errors import ApiError


def check_token(authorization: str | None, digest: bytes | None) -> None:
    """Require ``Authorization: Bearer <token>`` when a token is configured.

    Digests are compared with hmac.compare_digest, so timing says nothing about the token.
    """
    if digest is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError("unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), digest):
        raise ApiError("unauthorized", "wrong bearer token")


def parse_conditioning(spec: FamilySpec, query: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Query parameters -> the family's parsed conditioning; the message lists valid values."""
    given: dict[str, str] = {}
    for key, value in query:
        if key in given:
            raise ApiError("invalid_conditioning", f"query parameter {key!r} given twice")
        given[key] = value
    try:
        return spec.parse_conditioning(given)
    except (ValueError, KeyError) as err:
        raise ApiError("invalid_conditioning", str(err.args[0] if err.args else err)) from err


def check_content_length(headers: Mapping[str, str], limit: int) -> int | None:
    """The declared body size (None: not declared); a body over the limit is refused before
    a byte of it is read."""
    declared = headers.get("content-length")
    if declared is None:
        return None
    try:
        size = int(declared)
    except ValueError:
        raise ApiError("invalid_request", f"bad Content-Length header {declared!r}") from None
    if size > limit:
        raise ApiError("body_too_large", _too_large(size, limit))
    return size


async def read_body(
    chunks: AsyncIterator[bytes],
    limit: int,
    on_progress: Callable[[int], None] = lambda total: None,
) -> bytes:
    """Collect a streamed body, stopping as soon as it passes the limit (chunked uploads).

    ``on_progress(total)`` runs before each chunk is kept (it may refuse by raising).
    """
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise ApiError("body_too_large", _too_large(total, limit, at_least=True))
        on_progress(total)
        parts.append(chunk)
    if total == 0:
        raise ApiError("empty_body", "empty request body: send the .nii or .nii.gz file's bytes")
    return b"".join(parts)


def _too_large(size: int, limit: int, *, at_least: bool = False) -> str:
    more = "at least " if at_least else ""
    return (
        f"request body is {more}{size / 2**20:.1f} MiB, over the server's limit of "
        f"{limit / 2**20:.1f} MiB; send a gzip-compressed NIfTI (.nii.gz) or crop the volume"
    )


def decode_volume(
    body: bytes,
    *,
    max_voxels: int,
    label: str = "upload",
    on_header: Callable[[tuple[int, int, int]], None] = lambda shape: None,
) -> Volume:
    """Validate and load an uploaded NIfTI (size checked from the header first) or a zip of one
    DICOM CT series (size checked from the slice headers before any pixel is decoded).

    ``on_header(shape)`` runs once the size is known and, for NIfTI, before any voxel is
    decompressed or allocated: the replica reserves the decode's memory there (it may refuse
    by raising). A DICOM series reports its shape once assembled.
    """
    if is_zip(body):
        try:
            volume = load_dicom_series(body, name=label, max_voxels=max_voxels)
            on_header(volume.shape)
            return volume
        except SeriesTooLarge as err:
            raise ApiError("volume_too_large", str(err)) from err
        except DicomError as err:
            raise ApiError("invalid_dicom", str(err)) from err
    if has_dicom_marker(body):
        raise ApiError(
            "invalid_dicom", f"{label}: a single DICOM file; send the whole series as one .zip"
        )
    try:
        shape = read_header_shape(body, name=label, max_voxels=2**62)
        voxels = math.prod(shape)
        if voxels > max_voxels:
            raise ApiError(
                "volume_too_large",
                f"{label}: header claims {voxels:,} voxels (shape {shape}), over the server's "
                f"limit of {max_voxels:,}; crop or downsample the volume",
            )
        on_header(shape)
        return load_nifti(body, name=label, max_voxels=max_voxels)
    except NiftiError as err:
        raise ApiError("invalid_nifti", str(err)) from err
    except (ValueError, OverflowError) as err:
        # a header field the reader does not check converts badly (e.g. a NaN or infinite
        # vox_offset): still the upload's fault, and the answer must say so, not crash
        raise ApiError("invalid_nifti", f"{label}: unreadable NIfTI header ({err})") from err


def check_output_size(scale: Sequence[int], shape: Sequence[int], max_voxels: int) -> None:
    """Refuse, before any computation, an input whose output grid (``scale`` times finer per
    axis, e.g. thin slices from thick ones) would exceed the server's voxel limit."""
    voxels = math.prod(int(n) * int(f) for n, f in zip(shape, scale, strict=True))
    if voxels > max_voxels:
        raise ApiError(
            "volume_too_large",
            f"the output would have {voxels:,} voxels (input {tuple(shape)} refined "
            f"{'x'.join(str(int(f)) for f in scale)}), over the server's limit of "
            f"{max_voxels:,}; send a smaller volume",
        )


def check_working_size(
    data: DataInfo, shape: Sequence[int], affine: np.ndarray, max_voxels: int
) -> None:
    """Refuse a volume that the model's spacing would turn into a grid over the voxel limit
    (a small file whose header claims huge voxels: 100^3 voxels of 100 mm are 1250^3 at 8 mm)."""
    voxels = working_voxels(data, shape, affine)
    if voxels > max_voxels:
        spacing = "x".join(f"{s:.3g}" for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)))
        raise ApiError(
            "volume_too_large",
            f"resampled to the model's spacing ({'x'.join(f'{s:g}' for s in data.spacing)} mm), "
            f"this {'x'.join(map(str, shape))} volume of {spacing} mm voxels becomes "
            f"{voxels:,} voxels, over the server's limit of {max_voxels:,}; check the voxel "
            "size in its header (pixdim) or send a smaller volume",
        )


async def parse_views(
    body: bytes, content_type: str | None, *, max_views: int, max_pixels: int
) -> list[np.ndarray]:
    """The ``views`` files of a multipart/form-data body, decoded in upload order.

    A views model told nothing else answers with what it expects: the content type, the field
    name, the formats; every undecodable view is named with its position and file name.
    """
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    if not (content_type or "").lower().startswith("multipart/form-data"):
        raise ApiError(
            "wrong_input_kind",
            "this model takes X-ray views: send multipart/form-data with one 'views' file per "
            "view (PNG, 16-bit TIFF or 2D NIfTI) in the order GET /v1/models/{name} lists",
        )

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(
            Headers({"content-type": content_type or ""}),
            stream(),
            max_files=max_views,
            max_fields=16,
        ).parse()
    except MultiPartException as err:
        raise ApiError("invalid_request", f"unreadable multipart body: {err.message}") from None
    try:
        unknown = sorted({k for k in form if k != "views"})
        if unknown:
            raise ApiError(
                "invalid_request", f"unknown form field(s) {unknown}; send only 'views' files"
            )
        files = form.getlist("views")
        if not files or not all(isinstance(f, UploadFile) for f in files):
            raise ApiError("invalid_request", "no 'views' files in the form")
        views = []
        for i, f in enumerate(files):
            label = f"views[{i}] ({f.filename or 'unnamed'})"
            try:
                views.append(decode_view(await f.read(), label=label, max_pixels=max_pixels))
            except ViewError as err:
                raise ApiError("invalid_view", str(err)) from err
        return views
    finally:
        await form.close()


def encode_volume(array: np.ndarray, affine: np.ndarray) -> bytes:
    """HU prediction -> .nii.gz bytes (int16, input affine); fast gzip since it is per request."""
    raw = nifti_bytes(array, affine, dtype=np.int16, compress=False)
    return gzip.compress(raw, compresslevel=1, mtime=0)
