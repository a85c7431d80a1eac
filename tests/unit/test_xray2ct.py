"""xray2ct without Ray: shards, the model's scales, view checks, losses, a train step, predict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctray.config import ConfigError, from_dict
from ctray.data.build import BuildConfig
from ctray.data.nifti import save_nifti
from ctray.data.phantom import PhantomConfig, make_phantom
from ctray.data.shards import column_numpy, load_manifest, read_split
from ctray.families.xray2ct import losses
from ctray.families.xray2ct.config import PRESETS, XRay2CTConfig
from ctray.families.xray2ct.data import resample_to_grid
from ctray.families.xray2ct.model import XRay2CT
from ctray.families.xray2ct.spec import SPEC
from ctray.families.xray2ct.steps import fitted_backprojection, lr_at, select_views
from ctray.registry import DataInfo, get_family
from ctray.train.local import local_context

torch.set_num_threads(1)

PATCH = (16, 16, 16)
SPACING = (24.0, 16.0, 12.0)  # 384 x 256 x 192 mm: the default phantom's extent
WINDOW = {"lo": -1000.0, "hi": 1000.0}
DATA = DataInfo(patch_size=PATCH, spacing=SPACING, window=WINDOW)
DEBUG = from_dict(XRay2CTConfig, PRESETS["debug"])


def _config(**overrides) -> XRay2CTConfig:
    return from_dict(XRay2CTConfig, {**PRESETS["debug"], **overrides})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Three noise-free phantom subjects, one sample each, views at 0/45/90/135 deg."""
    out = tmp_path_factory.mktemp("xray2ct") / "shards"
    SPEC.build_shards(
        out=out,
        phantom=3,
        config=BuildConfig(patch_size=PATCH, spacing=SPACING, patches_per_subject=1),
        options={"photons": None},
        progress=False,
    )
    return out


def _batch(root: Path, split: str) -> dict[str, torch.Tensor]:
    table = read_split(root, split, SPEC.columns)
    return {c: torch.as_tensor(np.array(column_numpy(table[c]))) for c in SPEC.columns}


def test_registered_with_views_hook_and_presets() -> None:
    spec = get_family("xray2ct")
    assert spec is SPEC and spec.views is not None
    assert spec.final.metric == "psnr" and spec.final.mode == "max"
    assert spec.final.loop_defaults["grad_clip"] == 1.0
    assert spec.baselines == ("mean", "backprojection")
    assert {"debug", "demo", "a100"} <= set(spec.presets)
    for name in spec.presets:
        from_dict(XRay2CTConfig, spec.preset(name), where=name)


def test_shards_hold_views_volume_and_geometry(shards: Path) -> None:
    manifest = load_manifest(shards)
    assert manifest.patch_size == list(PATCH) and manifest.spacing == list(SPACING)
    geometry = manifest.build["family_options"]["geometry"]
    assert geometry["angles_deg"] == [0.0, 45.0, 90.0, 135.0] and geometry["beam"] == "cone"
    assert manifest.build["family_options"]["view_names"] == [
        "ap",
        "angle45",
        "lateral",
        "angle135",
    ]
    batch = _batch(shards, "train")
    n = batch["ct"].shape[0]
    assert batch["views"].shape == (n, 4, 16, 16) and batch["ct"].shape == (n, *PATCH)
    assert batch["body"].dtype == torch.uint8 and 0 < float(batch["body"].float().mean()) < 1
    assert float(batch["ct"].min()) >= 0.0 and float(batch["ct"].max()) <= 1.0
    assert batch["angles"][0].tolist() == [0.0, 45.0, 90.0, 135.0]


def test_config_views_and_depth_checks() -> None:
    assert _config().angles == (0.0, 90.0)
    assert _config(num_views=4).angles == (0.0, 45.0, 90.0, 135.0)
    assert _config(view_angles=[0, 60, 120]).angles == (0.0, 60.0, 120.0)
    with pytest.raises(ValueError, match="disagrees"):
        _config(num_views=2, view_angles=[0, 60, 120])
    with pytest.raises(ConfigError, match="unknown key"):
        _config(perceptual_weight=0.2)
    # The seed's "8-level U-Net" on 64^3 cannot exist: 64 halves to 1 after 6 levels.
    with pytest.raises(ValueError, match="multiples of 128"):
        XRay2CT(_config(levels=8), (64, 64, 64), (4.0, 4.0, 4.0))
    with pytest.raises(ValueError, match=">= 2 voxels"):
        XRay2CT(_config(levels=5), PATCH, SPACING)


@pytest.mark.parametrize("num_views", [1, 2, 4])
def test_outputs_at_every_scale_and_start_at_the_mean(num_views: int) -> None:
    torch.manual_seed(0)
    model = XRay2CT(_config(num_views=num_views, levels=3), PATCH, SPACING)
    views = torch.rand(2, num_views, 16, 16)
    outputs = model(views)
    assert [tuple(o.shape) for o in outputs] == [
        (2, 1, 16, 16, 16),
        (2, 1, 8, 8, 8),
        (2, 1, 4, 4, 4),
    ]
    # Zero-initialised heads on the mean volume: the untrained model is the mean baseline.
    ct = torch.rand(3, 1, *PATCH)
    model.update_mean(ct[:2])
    model.update_mean(ct[2:])
    assert torch.allclose(model.mean_ct[0], ct.mean(0), atol=1e-6)
    assert torch.allclose(model(views)[0], model.mean_ct.expand(2, -1, -1, -1, -1), atol=1e-6)
    assert "mean_ct" in model.state_dict() and "angles" not in model.state_dict()
    with pytest.raises(ValueError, match=r"expected views \(B, "):
        model(torch.rand(2, num_views + 1, 16, 16))


def test_view_inputs_prepare_validates_and_normalises() -> None:
    hook = SPEC.views
    described = hook.describe(DEBUG, DATA)
    json.dumps(described)
    assert described["count"] == 2 and described["names"] == ["ap", "lateral"]
    assert described["angles_deg"] == [0.0, 90.0] and described["image_size"] == [16, 16]
    assert described["geometry"]["beam"] == "cone" and "sdd_mm" in described["geometry"]
    rng = np.random.default_rng(0)
    views = [rng.random((16, 16)) * 4000, rng.random((48, 50)).astype(np.float32)]
    prepared = hook.prepare(views, DEBUG, DATA)
    assert prepared.shape == (1, 2, 16, 16) and prepared.dtype == torch.float32
    q = torch.quantile(prepared.flatten(2), torch.tensor([0.005, 0.995]), dim=-1)
    assert torch.allclose(q, torch.tensor([[0.0, 0.0], [1.0, 1.0]])[:, None], atol=1e-5)
    with pytest.raises(ValueError, match=r"expected 2 view\(s\) in this order: ap, lateral"):
        hook.prepare(views[:1], DEBUG, DATA)
    with pytest.raises(ValueError, match="aspect ratio"):
        hook.prepare([views[0], rng.random((16, 24))], DEBUG, DATA)
    bad = views[0].copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        hook.prepare([bad, views[1]], DEBUG, DATA)
    with pytest.raises(ValueError, match="2D image"):
        hook.prepare([views[0], rng.random((4, 16, 16))], DEBUG, DATA)
    affine, shape = hook.output_grid(DEBUG, DATA)
    assert shape == PATCH and np.allclose(np.diag(affine)[:3], SPACING)
    centre = affine @ np.array([*((np.array(PATCH) - 1) / 2.0), 1.0])
    assert np.allclose(centre[:3], 0.0)  # the isocentre at the world origin


def test_rendered_views_match_the_training_views(shards: Path) -> None:
    """The render hook (what `ctray drr` writes) prepares into the views the model trained on."""
    manifest = load_manifest(shards)
    record = next(r for r in manifest.inputs if r.split == "train")
    batch = _batch(shards, "train")
    row = [i.subject for i in manifest.inputs if i.split == "train"].index(record.subject)
    ct, _ = make_phantom(int(record.subject.split("-")[1]), config=PhantomConfig())
    rendered = SPEC.views.render(ct, DEBUG, DATA)
    assert list(rendered) == ["ap", "lateral"]
    prepared = SPEC.views.prepare(list(rendered.values()), DEBUG, DATA)
    trained = batch["views"][row : row + 1, [0, 2]]  # 0 and 90 deg of the 4 rendered
    assert torch.allclose(prepared, trained, atol=1e-4)
    assert torch.equal(select_views(batch, XRay2CT(DEBUG, PATCH, SPACING).geometry, "cpu")[
        row : row + 1], trained)  # fmt: skip


def test_select_views_checks_angles_and_geometry(shards: Path) -> None:
    batch = _batch(shards, "val")
    geometry = XRay2CT(_config(num_views=4), PATCH, SPACING).geometry
    assert select_views(batch, geometry, torch.device("cpu")).shape[1] == 4
    three = XRay2CT(_config(num_views=3), PATCH, SPACING).geometry  # 0, 60, 120 deg
    with pytest.raises(ValueError, match="60 deg was not rendered"):
        select_views(batch, three, torch.device("cpu"))
    parallel = XRay2CT(_config(beam="parallel"), PATCH, SPACING).geometry
    with pytest.raises(ValueError, match="geometry differs"):
        select_views(batch, parallel, torch.device("cpu"))


def test_losses_terms_and_weights() -> None:
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 16).reshape(1, 1, 16, 1, 1).expand(1, 1, 16, 16, 16)
    grad = losses.sobel(ramp.contiguous())
    assert torch.allclose(grad[0, 0, 2:-2], torch.full_like(grad[0, 0, 2:-2], 2 / 15), atol=1e-5)
    assert torch.allclose(grad[0, 1:], torch.zeros_like(grad[0, 1:]), atol=1e-6)
    target = torch.rand(2, 1, *PATCH)
    model = XRay2CT(DEBUG, PATCH, SPACING)
    views = losses.reproject(target, model.geometry, SPACING, losses.HUWindow(**WINDOW))
    outputs = [target, torch.nn.functional.avg_pool3d(target, 2)]
    total, terms = losses.reconstruction_losses(
        outputs, target, views, cfg=DEBUG, geometry=model.geometry, spacing=SPACING,
        window=losses.HUWindow(**WINDOW),
    )  # fmt: skip
    assert set(terms) == {"l1", "ssim", "edge", "fft", "deep", "projection"}
    assert float(total) == pytest.approx(0.0, abs=1e-4)  # a perfect prediction costs nothing
    off = [o + 0.1 for o in outputs]
    total, terms = losses.reconstruction_losses(
        off, target, views, cfg=_config(w_ssim=0.0, w_fft=0.0), geometry=model.geometry,
        spacing=SPACING, window=losses.HUWindow(**WINDOW),
    )  # fmt: skip
    assert "ssim" not in terms and "fft" not in terms
    assert float(terms["l1"]) == pytest.approx(0.1, rel=1e-4) and float(total) > 0.1


def test_schedule_and_backprojection_baseline() -> None:
    cfg = _config(lr=1e-3, warmup_steps=10, min_lr_ratio=0.0)
    assert lr_at(cfg, 0, 0, 10) == pytest.approx(1e-4)
    assert lr_at(cfg, 9, 0, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 500, 5, 10) == pytest.approx(0.5e-3)
    assert lr_at(cfg, 900, 9, 10) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(0.9 * math.pi)))
    target = torch.rand(2, 1, 4, 4, 4)
    assert torch.allclose(fitted_backprojection(target * 3 - 1, target), target, atol=1e-5)


def test_train_step_changes_weights_and_predict_fills_the_output_grid(shards: Path) -> None:
    torch.manual_seed(0)
    stage = SPEC.final
    ctx = local_context(SPEC, DEBUG, DATA, grad_clip=1.0)
    net = ctx.models["net"]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batch = _batch(shards, "train")
    for step in range(2):
        ctx.step = step
        out = stage.train_step(ctx, batch)
        ctx.optimize.end_batch()
    assert {"loss/total", "loss/projection", "loss/deep", "lr"} <= set(out)
    assert all(math.isfinite(v) for v in out.values())
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed) and "mean_ct" in changed
    assert float(net.mean_count) == 2 * batch["ct"].shape[0]
    net.eval()
    with torch.no_grad():
        metrics = stage.eval_step(ctx, _batch(shards, "val"))
    for key in ("psnr", "ssim", "mae_hu", "mean_psnr", "backprojection_psnr", "projection_l1"):
        assert torch.isfinite(metrics[key]).all(), key
    views = SPEC.views.prepare([np.random.rand(16, 16)] * 2, DEBUG, DATA)
    with torch.no_grad():
        volume = SPEC.predict(ctx.models, views, DEBUG, {})
    _, shape = SPEC.views.output_grid(DEBUG, DATA)
    assert volume.shape == (1, 1, *shape) and 0.0 <= float(volume.min()) <= float(volume.max()) <= 1
    first, output, target = stage.preview(ctx.models, _batch(shards, "val"), DEBUG)
    assert first.shape == output.shape == target.shape == PATCH


def test_paired_studies_and_partial_ones(tmp_path: Path) -> None:
    """Real radiographs beside their CT; a study missing a view is skipped with the reason."""
    ct, _ = make_phantom(7)
    for name in ("study-a", "study-b", "study-c"):
        (tmp_path / name).mkdir()
        save_nifti(tmp_path / name / "ct.nii.gz", ct.array, ct.affine)
    rng = np.random.default_rng(0)
    for name in ("study-a", "study-b"):
        img16 = (rng.random((40, 40)) * 60000).astype(np.uint16)
        Image.fromarray(img16).save(tmp_path / name / "ap.tif")
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(
            tmp_path / name / "lateral.png"
        )
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "study-c" / "ap.png")
    manifest = SPEC.build_shards(
        out=tmp_path / "shards",
        inputs=tmp_path,
        config=BuildConfig(patch_size=PATCH, spacing=SPACING, patches_per_subject=3),
        options={"rendered_angles": [0, 90]},
        progress=False,
    )
    assert sorted(r.subject for r in manifest.inputs) == ["study-a", "study-b"]
    assert all(r.rows == 1 and r.extra["views"] == "radiographs" for r in manifest.inputs)
    (skip,) = [s for s in manifest.skipped if "study-c" in s["path"]]
    assert "missing view image(s) lateral" in skip["reason"]
    # A CT on the output grid: centred on the scan, air outside it.
    hu = resample_to_grid(ct, (8, 8, 8), (100.0, 100.0, 100.0))
    assert float(hu[0, 0, 0]) == pytest.approx(-1000.0) and float(hu[4, 4, 4]) > -900
