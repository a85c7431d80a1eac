"""A DICOM series through `ctray predict` and `ctray serve`, for real: Ray Serve on 127.0.0.1,
a tiny exported phase-GAN whose random head changes the image, HTTP over loopback.

The series are written from the real CT (../shared/data/ct) with a flipped and an oblique
geometry; the answer must be a NIfTI on the series' grid, holding what the same model predicts
in-process for the NIfTI the client made from the series, which has the scan's voxels at the
scan's world coordinates.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicom_writer import real_crop, reoriented, world_aligned, write_series
from serve_support import TIMEOUT, export_test_model, free_port

from ctray.cli import main
from ctray.data.dicom import load_dicom_series
from ctray.data.nifti import Volume, load_nifti
from ctray.data.volumes import series_nifti_bytes
from ctray.serve import ServeConfig

MODEL = "tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_test_model(tmp_path_factory.mktemp("dicom_models") / MODEL)


@pytest.fixture(scope="module")
def url(ray_session, model_dir: Path) -> Iterator[str]:
    from ctray.serve.server import start, stop

    config = ServeConfig(
        models=model_dir,
        port=free_port(),
        batching=False,
        max_voxels=4_000_000,
        memory_budget_mb=256,
        app_name="ctray-dicom",
    )
    url = start(config)
    try:
        yield url
    finally:
        stop(config, shutdown=True)


@pytest.fixture(scope="module")
def crop(real_ct_dir: Path) -> Volume:
    return real_crop(real_ct_dir)


def _expected(model_dir: Path, vol: Volume) -> np.ndarray:
    """The model's prediction for ``vol`` computed in this process, as the server sends it
    (int16 HU)."""
    from ctray.inference import predict_volume
    from ctray.modeldir import load_model

    out = predict_volume(load_model(model_dir), vol, {"target_phase": "venous"})
    return np.clip(np.rint(out.array), -32768, 32767)


@pytest.mark.parametrize("kind", ["flipped", "oblique"])
def test_ctray_predict_sends_a_series_and_gets_a_nifti_on_its_grid(
    url: str,
    model_dir: Path,
    crop: Volume,
    tmp_path: Path,
    kind: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scan = reoriented(crop, kind)
    write_series(scan, tmp_path / "series", slope=1.0, intercept=-1024.0)
    out = tmp_path / "venous.nii.gz"
    argv = ["predict", str(tmp_path / "series"), "--url", url, "--model", MODEL]
    assert main([*argv, "--target-phase", "venous", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    got = load_nifti(out)
    series = load_dicom_series(tmp_path / "series")
    assert got.shape == series.shape
    np.testing.assert_allclose(got.affine, series.affine, atol=1e-4)  # the series' own grid
    sent = load_nifti(series_nifti_bytes(tmp_path / "series"))  # what the client uploads
    np.testing.assert_array_equal(sent.array, world_aligned(sent, scan))  # the scan, in place
    assert np.abs(got.array - _expected(model_dir, sent)).max() <= 1.0
    change = np.abs(got.array - world_aligned(got, scan)).mean()
    assert 5.0 < change < 200, "the model changes the image, and keeps the anatomy"


def test_server_takes_a_zipped_series_and_refuses_a_broken_one(
    url: str, crop: Volume, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_series(reoriented(crop, "flipped"), tmp_path / "series")

    def zipped(files: list[Path]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in files:
                zf.write(path, f"series/{path.name}")
        return buf.getvalue()

    predict = f"{url}/v1/models/{MODEL}/predict?target_phase=venous"
    r = httpx.post(predict, content=zipped(paths), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    got = load_nifti(r.content)
    series = load_dicom_series(tmp_path / "series")
    assert got.shape == series.shape
    np.testing.assert_allclose(got.affine, series.affine, atol=1e-4)
    r = httpx.post(predict, content=zipped(paths[:5] + paths[6:]), timeout=TIMEOUT)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_dicom"
    detail = r.json()["detail"]
    assert "slice(s) missing between" in detail and "IM0004.dcm" in detail, detail
    # `ctray predict` refuses a non-CT series before uploading anything
    write_series(crop, tmp_path / "mr", modality="MR")
    argv = ["predict", str(tmp_path / "mr"), "--url", url, "--model", MODEL, "-o", "x.nii.gz"]
    assert main(argv) == 2
    assert "modality 'MR', not CT" in capsys.readouterr().err
