"""X-ray view uploads: PNG / TIFF / 2D NIfTI decoding and the multipart parser, without Ray."""

from __future__ import annotations

import asyncio
import gzip
import io

import httpx
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ctray.data.images import ViewError, decode_view, encode_nifti_view, sniff_format
from ctray.serve.errors import ApiError
from ctray.serve.handling import parse_views


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiff16(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint16)).save(buffer, format="TIFF")
    return buffer.getvalue()


def test_formats_decode_to_the_same_pixels() -> None:
    rng = np.random.default_rng(0)
    img16 = rng.integers(0, 65535, (40, 30)).astype(np.uint16)
    img8 = (img16 // 256).astype(np.uint8)
    np.testing.assert_array_equal(decode_view(_tiff16(img16)), img16.astype(np.float32))
    np.testing.assert_array_equal(decode_view(_png(img8, "L")), img8.astype(np.float32))
    rgb = np.repeat(img8[..., None], 3, axis=2)
    np.testing.assert_allclose(decode_view(_png(rgb, "RGB")), img8, atol=1)
    floats = rng.normal(size=(40, 30)).astype(np.float32)
    nifti = encode_nifti_view(floats)
    assert sniff_format(nifti) == "nifti"
    np.testing.assert_array_equal(decode_view(nifti), floats)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"hello world" * 100, "not a PNG, TIFF or NIfTI"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot decode"),
        (gzip.compress(b"\x00" * 50)[:20], "truncated gzip|not a readable"),
    ],
)
def test_bad_views_are_named_errors(data: bytes, match: str) -> None:
    with pytest.raises(ViewError, match=match):
        decode_view(data, label="views[0] (x.bin)")


def test_volume_nan_and_oversized_views_are_refused() -> None:
    volume = nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4)).to_bytes()
    with pytest.raises(ViewError, match="not a 2D image"):
        decode_view(volume)
    nan = np.zeros((20, 20), np.float32)
    nan[3, 3] = np.nan
    with pytest.raises(ViewError, match="NaN"):
        decode_view(encode_nifti_view(nan))
    with pytest.raises(ViewError, match="over 100"):
        decode_view(_png(np.zeros((20, 20), np.uint8), "L"), max_pixels=100)
    # A gzip bomb: a small upload that inflates far past the pixel budget stops early.
    bomb = gzip.compress(
        nib.Nifti1Image(np.zeros((2000, 2000, 1), np.float32), np.eye(4)).to_bytes()
    )
    with pytest.raises(ViewError, match="decompresses to more than"):
        decode_view(bomb, max_pixels=10_000)


def _multipart(files: list[tuple[str, bytes]], field: str = "views") -> tuple[bytes, str]:
    request = httpx.Request(
        "POST", "http://x/", files=[(field, (name, data, "image/png")) for name, data in files]
    )
    return request.read(), request.headers["content-type"]


def test_multipart_views_keep_their_order() -> None:
    a, b = np.full((16, 16), 10, np.uint8), np.full((16, 16), 200, np.uint8)
    body, ctype = _multipart([("ap.png", _png(a, "L")), ("lat.png", _png(b, "L"))])
    views = asyncio.run(parse_views(body, ctype, max_views=4, max_pixels=10_000))
    assert [float(v.mean()) for v in views] == [10.0, 200.0]


def test_multipart_errors_say_what_to_send() -> None:
    view = _png(np.zeros((16, 16), np.uint8), "L")
    with pytest.raises(ApiError, match="multipart/form-data") as err:
        asyncio.run(parse_views(view, "application/octet-stream", max_views=4, max_pixels=10**6))
    assert err.value.status == 415
    body, ctype = _multipart([("ap.png", view)], field="image")
    with pytest.raises(ApiError, match="unknown form field"):
        asyncio.run(parse_views(body, ctype, max_views=4, max_pixels=10**6))
    body, ctype = _multipart([("ap.png", view), ("bad.txt", b"not an image at all" * 30)])
    with pytest.raises(ApiError, match=r"views\[1\] \(bad.txt\)") as err:
        asyncio.run(parse_views(body, ctype, max_views=4, max_pixels=10**6))
    assert err.value.status == 422
    body, ctype = _multipart([("v.png", view)] * 5)
    with pytest.raises(ApiError, match="unreadable multipart"):
        asyncio.run(parse_views(body, ctype, max_views=4, max_pixels=10**6))
