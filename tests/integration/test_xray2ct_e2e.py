"""xray2ct end to end: the smoke tune exports a model, `ctray drr` renders its views from the real
CT, and Ray Serve answers a multipart upload of those views with a CT on the documented grid."""

from __future__ import annotations

import gzip
import io
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from ctray.data.images import encode_nifti_view
from ctray.serve import CtrayClient, ServeConfig, ServeError

TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def xray_url(ray_session, xray2ct_smoke_export: Path) -> Iterator[str]:
    from ctray.serve.server import start, stop

    config = ServeConfig(models=xray2ct_smoke_export, port=_free_port(), app_name="ctray-xray-test")
    url = start(config)
    try:
        yield url
    finally:
        stop(config, shutdown=True)


def _decode(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def test_smoke_export_describes_its_views(xray2ct_smoke_export: Path, xray_url: str) -> None:
    with CtrayClient(xray_url, timeout=TIMEOUT) as client:
        (entry,) = client.models()
    assert entry["family"] == "xray2ct"
    views = entry["views"]
    assert views["count"] == len(views["names"]) == len(views["angles_deg"]) >= 2
    assert len(views["image_size"]) == 2


def test_views_rendered_from_the_real_ct_are_answered_on_the_documented_grid(
    xray2ct_smoke_export: Path, xray_url: str, real_ct_dir: Path, tmp_path: Path
) -> None:
    from ctray.cli import main
    from ctray.modeldir import load_model

    path = xray2ct_smoke_export / "smoke"
    out_dir = tmp_path / "views"
    assert (
        main(
            [
                "drr",
                str(real_ct_dir / "abdomen_native.nii.gz"),
                "--model",
                str(path),
                "--out",
                str(out_dir),
            ]
        )
        == 0
    )
    files = sorted(out_dir.glob("*.nii.gz"))
    model = load_model(path)
    described = model.spec.views.describe(model.config, model.data)
    assert [f.name.split("_", 1)[1].removesuffix(".nii.gz") for f in files] == described["names"]
    with CtrayClient(xray_url, timeout=TIMEOUT) as client:
        answer = _decode(client.predict_views(files, "smoke"))
    affine, shape = model.spec.views.output_grid(model.config, model.data)
    assert answer.shape == tuple(shape)
    np.testing.assert_allclose(answer.affine, affine, atol=1e-4)
    hu = np.asarray(answer.dataobj, dtype=np.float32)
    assert np.isfinite(hu).all() and hu.min() >= -1100 and hu.max() <= 3100
    # The CLI sends views too, and writes the same answer.
    written = tmp_path / "ct.nii.gz"
    rc = main(
        [
            "predict",
            "--url",
            xray_url,
            "--model",
            "smoke",
            "--views",
            *map(str, files),
            "-o",
            str(written),
        ]
    )
    assert rc == 0
    np.testing.assert_array_equal(np.asarray(nib.load(written).dataobj), np.asarray(answer.dataobj))


def test_malformed_uploads_get_4xx_that_say_what_to_send(
    xray2ct_smoke_export: Path, xray_url: str
) -> None:
    from ctray.modeldir import load_model

    model = load_model(xray2ct_smoke_export / "smoke")
    described = model.spec.views.describe(model.config, model.data)
    rows, cols = described["image_size"]
    good = encode_nifti_view(np.random.default_rng(0).random((rows, cols)).astype(np.float32))
    nan = np.zeros((rows, cols), np.float32)
    nan[1, 1] = np.nan
    cases = {
        "one view too few": ([good] * (described["count"] - 1), 422, "invalid_view"),
        "not an image": ([good, b"%PDF-1.4 this is not an image" * 20], 422, "invalid_view"),
        "nan": ([good, encode_nifti_view(nan)], 422, "invalid_view"),
    }
    with CtrayClient(xray_url, timeout=TIMEOUT) as client:
        for name, (views, status, code) in cases.items():
            with pytest.raises(ServeError) as err:
                client.predict_views(views, "smoke")
            assert err.value.status == status, name
            assert code in err.value.message, name
    raw = httpx.post(
        f"{xray_url}/v1/models/smoke/predict", content=io.BytesIO(good).read(), timeout=TIMEOUT
    )
    assert raw.status_code == 415 and raw.json()["error"] == "wrong_input_kind"
    assert "multipart/form-data" in raw.json()["detail"]
    # The replica is healthy after all that.
    assert httpx.get(f"{xray_url}/healthz", timeout=TIMEOUT).json()["status"] == "ok"
