"""slice_ldm: shards (phantom, thin scans, paired studies), shape checks, both stages, predict."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ctray.config import from_dict
from ctray.data.build import BuildConfig
from ctray.data.nifti import NiftiError, save_nifti
from ctray.data.shards import column_numpy
from ctray.data.thick_slices import ThickSliceConfig, simulate_thick
from ctray.families.slice_ldm.config import SliceLDMConfig
from ctray.families.slice_ldm.data import (
    SliceLDMDataOptions,
    load_thin_scan,
    paired_volumes,
    phantom_thin,
)
from ctray.families.slice_ldm.model import check_geometry
from ctray.families.slice_ldm.spec import SPEC
from ctray.registry import DataInfo, get_family
from ctray.train.local import local_context

# Debug geometry: thick (16, 16, 4) at 16 x 16 x 8 mm, factor 2 -> thin (16, 16, 8) at 4 mm z.
PATCH, SPACING, FACTOR = (16, 16, 4), (16.0, 16.0, 8.0), 2
BUILD = BuildConfig(patch_size=PATCH, spacing=SPACING, patches_per_subject=3)


def _cfg() -> SliceLDMConfig:
    return from_dict(SliceLDMConfig, SPEC.preset("debug"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("slice_ldm") / "shards"
    manifest = SPEC.build_shards(
        out=out, phantom=2, config=BUILD, options={"factor": FACTOR}, progress=False
    )
    table = pq.read_table(out / manifest.inputs[0].shard)
    batch = {k: torch.from_numpy(column_numpy(table[k]).copy()) for k in SPEC.columns}
    return manifest, DataInfo.from_manifest(manifest), batch


def test_registered_with_two_stages() -> None:
    assert get_family("slice_ldm") is SPEC
    assert SPEC.stage_names() == ["autoencoder", "diffusion"]
    assert SPEC.final.ema == ("denoiser",) and SPEC.baselines == ("linear", "cubic")


def test_phantom_shards_record_the_thin_grid(shards) -> None:
    manifest, data, batch = shards
    assert manifest.build["output_scale"] == [1, 1, FACTOR]
    assert manifest.build["family_options"]["factor"] == FACTOR
    assert data.output_scale == (1, 1, FACTOR) and data.output_patch == (16, 16, 8)
    assert batch["thick"].shape[1:] == PATCH and batch["thin"].shape[1:] == (16, 16, 8)
    assert batch["body"].shape == batch["thin"].shape and batch["body"].dtype == torch.uint8
    assert float(batch["thin"].min()) >= 0 and float(batch["thin"].max()) <= 1
    # the thick patch is the slab mean of its thin patch (box profile, no extra noise) wherever
    # the window clips none of the slab's voxels
    slabs = batch["thin"].reshape(*batch["thin"].shape[:-1], PATCH[2], FACTOR)
    inside = ((slabs > 0) & (slabs < 1)).all(-1)
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(batch["thick"][inside], slabs.mean(-1)[inside], atol=1e-5, rtol=0)


def test_thin_scans_and_paired_studies_build_and_bad_inputs_are_refused(tmp_path: Path) -> None:
    thin = phantom_thin(7, (16.0, 16.0, 4.0))
    save_nifti(tmp_path / "scan.nii.gz", thin.array, thin.affine)
    thick, truth = simulate_thick(thin, ThickSliceConfig(factor=FACTOR))
    (tmp_path / "patient1").mkdir()
    save_nifti(tmp_path / "patient1" / "thick.nii.gz", thick.array, thick.affine)
    save_nifti(tmp_path / "patient1" / "thin.nii.gz", truth.array, truth.affine)
    (tmp_path / "lonely").mkdir()
    save_nifti(tmp_path / "lonely" / "thick.nii.gz", thick.array, thick.affine)
    manifest = SPEC.build_shards(
        out=tmp_path / "out",
        inputs=tmp_path,
        config=BUILD,
        options={"factor": FACTOR},
        progress=False,
    )
    assert sorted(r.subject for r in manifest.inputs) == ["patient1", "scan"]
    assert manifest.skipped == [
        {
            "path": str(tmp_path / "lonely"),
            "reason": "a paired study needs thick and thin, each a NIfTI file (.nii or "
            ".nii.gz), a DICOM series folder or a .zip of one (missing thin)",
        }
    ]
    pair = next(r for r in manifest.inputs if r.subject == "patient1")
    assert pair.extra["simulated"] is False and pair.extra["thick_shape"][2] * 2 == pair.shape[2]
    # 8 mm slices cannot be the truth of 4 mm ones; a thick scan of other spacing is refused
    save_nifti(tmp_path / "coarse.nii.gz", thick.array, thick.affine)
    with pytest.raises(NiftiError, match="coarser than the thin spacing"):
        load_thin_scan(tmp_path / "coarse.nii.gz", (16.0, 16.0, 4.0), 1.25)
    labels = (thin.array > 0).astype("int16")  # a label map beside the scans is not a CT
    save_nifti(tmp_path / "seg.nii.gz", labels, thin.affine)
    with pytest.raises(NiftiError, match="not a CT in Hounsfield units"):
        load_thin_scan(tmp_path / "seg.nii.gz", (16.0, 16.0, 4.0), 1.25)
    other = dataclasses.replace(BUILD, spacing=(16.0, 16.0, 12.0))
    with pytest.raises(NiftiError, match=r"--spacing X Y 8.00"):
        paired_volumes(
            tmp_path / "patient1" / "thick.nii.gz",
            tmp_path / "patient1" / "thin.nii.gz",
            other,
            SliceLDMDataOptions(factor=3),
        )


def test_shape_checks_name_the_fix() -> None:
    cfg = _cfg()
    assert check_geometry(cfg, PATCH, (1, 1, FACTOR)) == (8, 8, 4)
    with pytest.raises(ValueError, match="output_scale"):
        check_geometry(cfg, PATCH, (1, 1, 1))
    deep = from_dict(SliceLDMConfig, {**SPEC.preset("debug"), "ae_channels": [8, 8, 8]})
    with pytest.raises(ValueError, match=r"not divisible by 4 .* fewer ae_channels levels"):
        check_geometry(deep, (16, 16, 3), (1, 1, FACTOR))  # thin z 6 would be truncated
    with pytest.raises(ValueError, match="fewer unet_channels levels"):
        check_geometry(cfg, (16, 16, 3), (1, 1, FACTOR))  # latent z 3 cannot be halved
    with pytest.raises(ValueError, match="lower disc_layers"):
        check_geometry(
            from_dict(SliceLDMConfig, {**SPEC.preset("debug"), "disc_layers": 3}),
            PATCH,
            (1, 1, FACTOR),
        )
    with pytest.raises(ValueError, match="norm_groups"):
        SliceLDMConfig(ae_channels=(8, 12), norm_groups=8)
    # the shipped presets fit the patches they are meant for
    demo = from_dict(SliceLDMConfig, SPEC.preset("demo"))
    assert check_geometry(demo, (32, 32, 8), (1, 1, 5)) == (16, 16, 20)
    a100 = from_dict(SliceLDMConfig, SPEC.preset("a100"))
    assert check_geometry(a100, (64, 64, 16), (1, 1, 5)) == (16, 16, 20)


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_autoencoder_step_trains_the_autoencoder(shards) -> None:
    _, data, batch = shards
    torch.manual_seed(0)
    ctx = local_context(SPEC, _cfg(), data, stage="autoencoder")
    before = {k: v.clone() for k, v in ctx.models["autoencoder"].state_dict().items()}
    losses = SPEC.stage("autoencoder").train_step(ctx, batch)
    assert {"loss/l1", "loss/kl", "loss/adv", "loss/d"} <= set(losses)  # debug: no warm-up
    assert _changed(before, ctx.models["autoencoder"])
    ctx.models = {k: m.eval() for k, m in ctx.models.items()}
    with torch.no_grad():
        metrics = SPEC.stage("autoencoder").eval_step(ctx, batch)
    assert set(metrics) == {"recon_psnr", "recon_ssim", "recon_mae_hu"}
    assert all(v.shape == (batch["thin"].shape[0],) for v in metrics.values())


def test_diffusion_step_freezes_the_autoencoder_sets_scales_once_and_predicts(shards) -> None:
    _, data, batch = shards
    cfg = _cfg()
    torch.manual_seed(0)
    ctx = local_context(SPEC, cfg, data, stage="diffusion")
    assert set(ctx.models) >= {"autoencoder", "denoiser"}
    ae, den = ctx.models["autoencoder"], ctx.models["denoiser"]
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    frozen = {k: v.clone() for k, v in ae.state_dict().items()}
    before = {k: v.clone() for k, v in den.unet.state_dict().items()}
    with pytest.raises(RuntimeError, match="never measured"):
        SPEC.predict(ctx.models, batch["thick"][:1, None], cfg, {})
    step = SPEC.stage("diffusion").train_step
    step(ctx, batch)
    scales = (float(den.cond_scale), float(den.target_scale))
    assert all(s > 0 for s in scales)
    step(ctx, {k: v.flip(0) * (0.5 if k != "body" else 1) for k, v in batch.items()})
    assert (float(den.cond_scale), float(den.target_scale)) == scales  # measured once
    assert not _changed(frozen, ae)
    assert _changed(before, den.unet)
    state = den.state_dict()
    assert float(state["cond_scale"]) == scales[0] and float(state["target_scale"]) == scales[1]

    den.eval()
    x = batch["thick"][:2, None]
    with torch.no_grad():
        y = SPEC.predict(ctx.models, x, cfg, {})
        again = SPEC.predict(ctx.models, x, cfg, {})
        metrics = SPEC.stage("diffusion").eval_step(ctx, batch)
    assert y.shape == (2, 1, *data.output_patch) and 0 <= float(y.min()) <= float(y.max()) <= 1
    torch.testing.assert_close(y, again)  # seeded DDIM (eta 0): repeatable
    for name in ("psnr", "ssim", "psnr_soft", "ssim_soft", "mae_hu"):
        for prefix in ("", "linear_", "cubic_"):
            assert metrics[prefix + name].shape == (batch["thick"].shape[0],)
    assert "psnr_decode" in metrics  # the other reading of the latent (output=cubic_delta)
    with pytest.raises(ValueError, match="not divisible"):
        SPEC.predict(ctx.models, torch.rand(1, 1, 15, 16, 4), cfg, {})
