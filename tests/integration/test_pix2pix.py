"""pix2pix end to end with real Ray: tune -> export -> load -> predict a NIfTI on its own grid;
shards from the real CT (A native, B its simulated venous phase) train through Ray Train."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from ctray.data.build import BuildConfig
from ctray.data.nifti import load_nifti, save_nifti
from ctray.data.phases import SimulatorConfig, parse_phase, simulate_phases

TINY = BuildConfig(window_lo=-1000.0, window_hi=1000.0)


def test_smoke_script_exports_a_model_that_predicts_a_volume(pix2pix_smoke_export, tmp_path):
    from ctray.families.pix2pix.data import phantom_pair
    from ctray.families.pix2pix.evaluate import evaluate_pair
    from ctray.inference import predict_volume
    from ctray.modeldir import load_model

    path = pix2pix_smoke_export / "smoke"
    meta = json.loads((path / "model.json").read_text())
    assert meta["family"] == "pix2pix" and meta["modules"] == ["generator"]
    assert meta["data"]["patch_size"] == [32, 32, 1]
    for key in ("mae_hu", "identity_mae_hu", "psnr", "ssim"):
        assert np.isfinite(meta["metrics"][key])

    model = load_model(path)
    a, b = phantom_pair(7)  # a subject the model never saw
    vol = a.array[::-1].copy()  # LAS orientation: the model must undo it
    affine = np.diag([-1.0, 1.0, 1.0, 1.0]) @ a.affine
    src = save_nifti(tmp_path / "a.nii.gz", vol, affine)
    loaded = load_nifti(src)
    out = predict_volume(model, loaded, {}, sw_batch_size=8).array
    assert out.shape == loaded.shape and np.isfinite(out).all()
    written = save_nifti(tmp_path / "out.nii.gz", out, loaded.affine)
    np.testing.assert_allclose(nib.load(written).affine, nib.load(src).affine)
    per_volume = evaluate_pair(model, a, b, sw_batch_size=16)
    assert np.isfinite(per_volume["mae_hu"]) and per_volume["identity_mae_hu"] > 0

    assert meta["data"]["resize_inplane"] is True
    assert model.data.resize_inplane


def _real_pairs(real_ct_dir: Path, root: Path) -> Path:
    native = load_nifti(real_ct_dir / "abdomen_native.nii.gz")
    labels = load_nifti(real_ct_dir / "abdomen_native_seg.nii.gz", dtype=np.uint8).array
    for split, name, seed in (("train", "abdomen", 0), ("test", "abdomen_sim1", 1)):
        sim = simulate_phases(
            native,
            labels,
            seed=seed,
            phases=("native", "venous"),
            config=SimulatorConfig(semi_paired=False),
        )
        save_nifti(root / f"{split}A" / f"{name}.nii.gz", native.array, native.affine)
        venous = sim[parse_phase("venous")].truth
        save_nifti(root / f"{split}B" / f"{name}.nii.gz", venous, native.affine)
    return root


def test_real_ct_pairs_build_shards_and_train(ray_session, real_ct_dir, tmp_path):
    from ctray.config import from_dict
    from ctray.families.pix2pix.data import build
    from ctray.families.pix2pix.spec import SPEC
    from ctray.train.loop import LoopConfig
    from ctray.train.trainer import make_trainer

    root = _real_pairs(real_ct_dir, tmp_path / "pairs")
    out = tmp_path / "shards"
    manifest = build(out=out, inputs=root, config=TINY, options={"resize_to": 64}, progress=False)
    assert manifest.skipped == []
    assert {r.subject: r.split for r in manifest.inputs} == {
        "abdomen": "train",
        "abdomen_sim1": "val",
    }
    assert manifest.inputs[0].shape == [122, 101, 30]
    assert 10 <= manifest.counts["train"] <= 30  # slices with >= 5% body

    trainer = make_trainer(
        spec=SPEC,
        loop=LoopConfig(
            family="pix2pix", epochs=2, batch_size=4, max_train_batches=3, max_val_batches=2
        ),
        family_config=from_dict(SPEC.config_cls, SPEC.preset("debug")),
        data_dir=out,
        storage_path=str(tmp_path / "runs"),
        name="real",
    )
    result = trainer.fit()
    assert result.error is None
    assert result.metrics["epoch"] == 1
    assert np.isfinite(result.metrics["val/mae_hu"])
    assert result.metrics["val/identity_mae_hu"] > 0  # venous differs from native in organs
    # a train pass cut short by max_train_batches streams every epoch; the capped validation
    # pass is kept in the worker, so both epochs were judged on the same 2 batches
    assert result.metrics["data/train_rows_in_memory"] == 0
    assert result.metrics["data/val_rows_in_memory"] == 8
