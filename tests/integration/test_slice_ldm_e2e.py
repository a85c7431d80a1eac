"""slice_ldm end to end with real Ray: the smoke script tunes the autoencoder, exports it, tunes
the diffusion stage on that export, exports a self-contained model, and Ray Serve turns a thick
real CT into thin slices on the refined grid."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctray.data.grid import refine_grid
from ctray.data.nifti import load_nifti, nifti_bytes
from ctray.data.thick_slices import thick_affine, thick_from_thin
from ctray.serve import CtrayClient, ServeConfig, ServeError

TIMEOUT = 300.0
MAX_VOXELS = 300_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_stages_export_with_lineage_and_load_alone(slice_ldm_smoke_export: Path, tmp_path):
    from ctray.inference import predict_volume
    from ctray.modeldir import load_model, weights_digest

    first = json.loads((slice_ldm_smoke_export / "smoke-autoencoder" / "model.json").read_text())
    final = json.loads((slice_ldm_smoke_export / "smoke" / "model.json").read_text())
    assert first["stage"] == "autoencoder" and first["servable"] is False
    assert final["stage"] == "diffusion" and final["servable"] is True
    assert {"autoencoder", "denoiser"} <= set(final["modules"])
    (lineage,) = final["lineage"]
    assert lineage["stage"] == "autoencoder"
    assert lineage["weights_sha256"] == weights_digest(slice_ldm_smoke_export / "smoke-autoencoder")
    factor = final["data"]["output_scale"][2]
    assert final["data"]["output_scale"] == [1, 1, factor] and factor > 1
    for key in ("psnr", "linear_psnr", "cubic_psnr", "ssim", "mae_hu"):
        assert np.isfinite(final["metrics"][key]), key
    assert "cubic" in (slice_ldm_smoke_export / "smoke" / "report.txt").read_text()
    # The export needs nothing but its own directory.
    alone = shutil.copytree(slice_ldm_smoke_export / "smoke", tmp_path / "elsewhere" / "m")
    model = load_model(alone)
    rng = np.random.default_rng(0)
    thick = rng.normal(0, 200, (20, 18, 5)).astype(np.float32)
    from ctray.data.nifti import Volume

    affine = np.diag([*model.data.spacing, 1.0])
    out = predict_volume(model, Volume(array=thick, affine=affine), {})
    assert out.array.shape == (20, 18, 5 * factor) and np.isfinite(out.array).all()


@pytest.fixture(scope="module")
def ldm_url(ray_session, slice_ldm_smoke_export: Path) -> Iterator[str]:
    from ctray.serve.server import start, stop

    config = ServeConfig(
        models=slice_ldm_smoke_export,
        port=_free_port(),
        max_voxels=MAX_VOXELS,
        app_name="ctray-ldm-test",
    )
    url = start(config)
    try:
        yield url
    finally:
        stop(config, shutdown=True)


def _thick_real_ct(real_ct_dir: Path, factor: int):
    thin = load_nifti(real_ct_dir / "abdomen_native.nii.gz")
    depth = thin.shape[2] // factor * factor
    return (
        thick_from_thin(thin.array[:, :, :depth], factor),
        thick_affine(thin.affine, factor),
    )


def test_a_thick_real_ct_comes_back_on_the_thin_grid(ldm_url: str, real_ct_dir: Path) -> None:
    with CtrayClient(ldm_url, timeout=TIMEOUT) as client:
        (entry,) = client.models()  # the autoencoder export is not servable
        assert entry["name"] == "smoke" and entry["output"]["grid"] == "refined"
        factor = entry["output"]["scale"][2]
        thick, affine = _thick_real_ct(real_ct_dir, factor)
        crop = thick[20:80, 20:70]  # the output of the whole scan is over the server's limit
        crop_affine = affine.copy()
        crop_affine[:3, 3] = affine[:3, :3] @ np.array([20.0, 20.0, 0.0]) + affine[:3, 3]
        answer = client.predict(nifti_bytes(crop, crop_affine), "smoke")
        with pytest.raises(ServeError) as err:
            client.predict(nifti_bytes(thick, affine), "smoke")
    image = nib.Nifti1Image.from_bytes(gzip.decompress(answer))
    expected_affine, expected_shape = refine_grid(crop_affine, crop.shape, (1, 1, factor))
    assert image.shape == expected_shape
    np.testing.assert_allclose(image.affine, expected_affine, atol=1e-4)
    hu = np.asarray(image.dataobj, dtype=np.float32)
    assert np.isfinite(hu).all() and hu.min() >= -1100 and hu.max() <= 3200
    assert err.value.status == 413 and "output would have" in err.value.message
