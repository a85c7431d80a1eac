"""maskgit_fsq end to end with real Ray: the smoke script tunes the tokenizer over two FSQ level
tuples (multi-objective, Pareto front saved and a point exported by the family's rule), tunes
the transformer on that export, and Ray Serve turns the real native CT into an arterial phase
on the input's own grid, with decoding steps and temperature as query parameters."""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctray.data.nifti import load_nifti, nifti_bytes
from ctray.serve import CtrayClient, ServeConfig, ServeError

TIMEOUT = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tokenizer_front_is_saved_and_the_rule_picks_the_export(maskgit_smoke_export: Path):
    from ctray.families.maskgit_fsq.steps import smallest_codebook_near_best_psnr
    from ctray.modeldir import weights_digest

    tok_dir = maskgit_smoke_export / "smoke-tokenizer"
    first = json.loads((tok_dir / "model.json").read_text())
    assert first["stage"] == "tokenizer" and first["servable"] is False
    front = json.loads((tok_dir / "pareto.json").read_text())
    assert front["objectives"] == [["recon_psnr", "max"], ["codebook_size", "min"]]
    trials = front["trials"]
    assert len({t["config"]["fsq_levels"] for t in trials}) == 2  # two level tuples tried
    on_front = [t for t in trials if t["on_front"]]
    assert on_front and all(t["recon_psnr"] is not None for t in on_front)
    points = [{k: t[k] for k in ("recon_psnr", "codebook_size")} for t in on_front]
    chosen = on_front[smallest_codebook_near_best_psnr(points)]
    assert chosen["chosen"] and front["chosen"] == chosen["trial"]
    assert first["family_config"]["fsq_levels"] == chosen["config"]["fsq_levels"]
    size = int(np.prod([int(v) for v in chosen["config"]["fsq_levels"].split(",")]))
    assert first["metrics"]["codebook_size"] == size
    assert 0 < first["metrics"]["codebook_usage"] <= 1 and first["metrics"]["perplexity"] >= 1

    final = json.loads((maskgit_smoke_export / "smoke" / "model.json").read_text())
    assert final["stage"] == "maskgit" and final["servable"] is True
    assert {"tokenizer", "transformer"} <= set(final["modules"])
    (lineage,) = final["lineage"]
    assert lineage["weights_sha256"] == weights_digest(tok_dir)
    assert final["family_config"]["fsq_levels"] == first["family_config"]["fsq_levels"]
    for key in ("mae_hu", "identity_mae_hu", "balanced_mae_hu", "psnr", "ssim", "token_acc"):
        assert np.isfinite(final["metrics"][key]), key
    assert "identity" in (maskgit_smoke_export / "smoke" / "report.txt").read_text()


@pytest.fixture(scope="module")
def maskgit_url(ray_session, maskgit_smoke_export: Path) -> Iterator[str]:
    from ctray.serve.server import start, stop

    config = ServeConfig(
        models=maskgit_smoke_export, port=_free_port(), app_name="ctray-maskgit-test"
    )
    url = start(config)
    try:
        yield url
    finally:
        stop(config, shutdown=True)


def test_the_real_native_ct_comes_back_arterial_on_its_grid(
    maskgit_url: str, real_ct_dir: Path
) -> None:
    native = load_nifti(real_ct_dir / "abdomen_native.nii.gz")
    body = nifti_bytes(native.array, native.affine)
    with CtrayClient(maskgit_url, timeout=TIMEOUT) as client:
        (entry,) = client.models()  # the tokenizer export is not servable
        assert entry["name"] == "smoke"
        assert {"target_phase", "steps", "temperature"} <= set(entry["conditioning"])
        answer = client.predict(body, "smoke", target_phase="arterial")
        quick = client.predict(body, "smoke", target_phase="arterial", steps=2, temperature=0.5)
        with pytest.raises(ServeError) as err:
            client.predict(body, "smoke", target_phase="arterial", steps=0)
    assert err.value.status == 422 and "steps must be" in err.value.message
    for data in (answer, quick):
        image = nib.Nifti1Image.from_bytes(gzip.decompress(data))
        assert image.shape == native.shape
        np.testing.assert_allclose(image.affine, native.affine, atol=1e-4)
        hu = np.asarray(image.dataobj, dtype=np.float32)
        # The model's change is added to the input's own voxels and lives inside the
        # -1000..1000 HU window (a 2000 HU range; resampling may overshoot a little).
        change = np.abs(hu - native.array.astype(np.float32))
        assert np.isfinite(hu).all() and change.max() <= 2200
