"""Real Ray end to end: tune -> export -> load -> predict a NIfTI; the experiment script;
resume of an interrupted experiment; shards from the real CT streamed with Ray Data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctray.data.nifti import load_nifti, save_nifti
from ctray.data.phantom import PhantomConfig, make_phantom

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "tune_phase_gan.py"


def _lps_phantom(path: Path) -> Path:
    """A phantom saved in LPS orientation with a spacing unlike the training spacing."""
    vol, _ = make_phantom(
        seed=11, config=PhantomConfig(shape=(40, 36, 20), spacing=(5.0, 5.0, 6.0))
    )
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine = flip @ vol.affine
    save_nifti(path, vol.array[::-1, ::-1, :].copy(), affine)
    return path


def test_tune_exports_a_model_that_predicts_on_the_input_grid(
    ray_session, phantom_shards, tmp_path
):
    from ctray.inference import predict_volume
    from ctray.modeldir import load_model
    from ctray.train.trainer import Resources
    from ctray.tune.export import export_best
    from ctray.tune.runner import TuneSettings, run_tune
    from ctray.tune.search_space import parse_search_space

    space = parse_search_space(
        {
            "family": "phase_gan",
            "preset": "debug",
            "params": {
                "lambda_rec": {"loguniform": [1.0, 50.0]},
                "grl_schedule": {"choice": ["linear", "dann"]},
            },
        }
    )
    settings = TuneSettings(
        num_samples=2, epochs=2, batch_size=2, max_train_batches=3, max_val_batches=2
    )
    grid = run_tune(
        space=space,
        data_dir=phantom_shards,
        storage_path=str(tmp_path / "runs"),
        name="it",
        settings=settings,
        resources=Resources(workers=2),  # two DDP ranks (gloo) per trial
    )
    assert len(grid) == 2 and not grid.errors
    path, metrics = export_best(grid, "phase_gan", tmp_path / "exported" / "best", experiment="it")

    meta = json.loads((path / "model.json").read_text())
    assert meta["family"] == "phase_gan"
    assert meta["data"]["patch_size"] == [16, 16, 16]
    assert np.isfinite(meta["metrics"]["mae_hu"]) and np.isfinite(
        meta["metrics"]["identity_mae_hu"]
    )
    assert meta["metrics"]["mae_hu"] == pytest.approx(metrics["val/mae_hu"])
    assert (path / "weights.safetensors").is_file()

    model = load_model(path)
    src = _lps_phantom(tmp_path / "lps.nii.gz")
    vol = load_nifti(src)
    out = predict_volume(model, vol, {"target_phase": "venous"}).array
    assert out.shape == vol.shape
    save_nifti(tmp_path / "out.nii.gz", out, vol.affine)
    written = nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_allclose(written.affine, nib.load(src).affine)
    assert np.isfinite(out).all()
    # Voxels far outside the body (air) stay air: the model changes anatomy, not geometry.
    assert abs(float(out[0, 0, 0]) - float(vol.array[0, 0, 0])) < 50


def test_smoke_test_script_exports_a_servable_model(smoke_export):
    from ctray.modeldir import find_models, load_model

    assert [p.name for p in find_models(smoke_export)] == ["smoke"]
    model = load_model(smoke_export / "smoke")
    assert model.spec.name == "phase_gan"
    assert set(model.models) == {"encoder", "phase_code", "generator"}


def _trial_rows(experiment: Path) -> dict[str, int]:
    rows = {}
    for result in experiment.glob("*/result.json"):
        rows[result.parent.name] = sum(
            1 for line in result.read_text().splitlines() if line.strip()
        )
    return rows


def test_resume_of_an_interrupted_experiment(ray_session, tmp_path):
    storage, export = tmp_path / "runs", tmp_path / "exported"
    args = [
        "--smoke-test",
        "--storage",
        str(storage),
        "--export",
        str(export),
        "--shards-dir",
        str(tmp_path / "shards"),
        "--max-concurrent",
        "1",
    ]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args, "--name", "phase_gan-interrupted"],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    experiment = storage / "phase_gan-interrupted"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            rows = _trial_rows(experiment)
            if len(rows) == 2 and min(rows.values()) >= 1:
                break  # first trial finished (one at a time), the second has reported
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("the first run never reached its second trial")
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before = _trial_rows(experiment)
    finished = {k: v for k, v in before.items() if v == 3}
    assert finished, f"expected one finished trial before the interruption, got {before}"

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import tune_phase_gan
    finally:
        sys.path.pop(0)
    assert tune_phase_gan.main([*args, "--resume"]) == 0
    after = _trial_rows(experiment)
    assert set(after) == set(before), "resume must not start new trials"
    for trial, count in finished.items():
        assert after[trial] == count, f"finished trial {trial} was re-run"
    assert (export / "phase_gan-interrupted" / "model.json").is_file()


def test_real_ct_shards_stream_through_ray_data(ray_session, real_ct_dir, tmp_path):
    import ray

    from ctray.data.build import BuildConfig
    from ctray.data.shards import load_manifest, sha256_file
    from ctray.families.phase_gan.data import build
    from ctray.metrics import LABEL_CLASSES

    out = tmp_path / "real"
    manifest = build(
        out=out,
        inputs=real_ct_dir,
        config=BuildConfig(patch_size=(32, 32, 16), spacing=(3.0, 3.0, 3.0), patches_per_subject=4),
        options={"simulations": 2, "source_phases": ["native"], "target_phases": ["venous"]},
        progress=False,
    )
    assert manifest.counts["train"] > 0 and manifest.counts["val"] > 0
    assert {s["path"].split("/")[-1] for s in manifest.skipped} == {"README.md"}
    rec = load_manifest(out).inputs[0]
    assert rec.checksums["scan"] == sha256_file(real_ct_dir / "abdomen_native.nii.gz")

    ds = ray.data.read_parquet(
        manifest.shard_files(out, "val"), columns=["source", "truth", "labels"]
    )
    batch = next(iter(ds.iter_torch_batches(batch_size=4)))
    assert tuple(batch["source"].shape[1:]) == (32, 32, 16)
    # Venous truth vs native input inside the aorta: +110..+140 HU (window width 2000 HU).
    aorta = batch["labels"] == LABEL_CLASSES["aorta"]
    if aorta.any():
        gain = float((batch["truth"][aorta] - batch["source"][aorta]).mean()) * 2000
        assert 80 < gain < 200
