"""Phase-GAN networks and steps on tiny CPU shapes: shapes, identity init, gradient routing."""

from __future__ import annotations

import itertools

import pytest
import torch

from ctray.config import from_dict, replace
from ctray.families.phase_gan import steps
from ctray.families.phase_gan.config import PhaseGANConfig
from ctray.families.phase_gan.model import unet_levels
from ctray.nn.gan import discriminator_step
from ctray.registry import DataInfo, StepContext, get_family
from ctray.train.local import local_context

SPEC = get_family("phase_gan")
STAGE = SPEC.final
DATA = DataInfo(patch_size=(16, 16, 16), spacing=(3.0, 3.0, 3.0), window={"lo": -1000, "hi": 1000})
B = 2
GEN_PARTS = ("encoder", "phase_code", "generator")


def _cfg(**overrides) -> PhaseGANConfig:
    return replace(from_dict(SPEC.config_cls, SPEC.preset("debug")), overrides)


def _models(cfg: PhaseGANConfig | None = None, seed: int = 0):
    cfg = cfg or _cfg()
    torch.manual_seed(seed)
    models = SPEC.build_models(cfg, DATA)
    return cfg, models, STAGE.build_optimizers(cfg, models)


def _ctx(cfg, models, opts, epoch: int = 0) -> StepContext:
    return local_context(
        SPEC, cfg, DATA, models=models, optimizers=opts, epoch=epoch, num_epochs=10
    )


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {k: torch.rand(B, 16, 16, 16, generator=g) for k in ("source", "target", "truth")}
    labels = torch.zeros(B, 16, 16, 16, dtype=torch.uint8)
    labels[:, 2:14, 2:14, 2:14] = 1
    labels[:, 4:8, 4:8, 4:8] = 4  # liver
    labels[0, 9:12, 9:12, 9:12] = 2  # aorta only in sample 0
    batch["labels"] = labels
    batch["source_phase"] = torch.tensor([3, 0], dtype=torch.int8)
    batch["target_phase"] = torch.tensor([1, 2], dtype=torch.int8)
    return batch


@pytest.fixture(scope="module")
def fresh():
    """Freshly initialised models for tests that do not train or modify them."""
    return _models()


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before, strict=True))


def _x(seed: int = 1) -> torch.Tensor:
    return torch.rand(B, 1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- models


def test_debug_models_and_shapes(fresh) -> None:
    cfg, models, opts = fresh
    assert set(models) == {"encoder", "phase_code", "generator", "discriminator", "detector"}
    assert set(opts) == {"g", "d", "det"}
    assert unet_levels(cfg.vit_patch) == 3
    x = _x()
    grid, z = models["encoder"](x)
    assert grid.shape == (B, cfg.vit_hidden, 2, 2, 2)
    assert z.shape == (B, cfg.vit_hidden)
    y = steps.generate(models, x, torch.tensor([0, 1]))
    assert y.shape == x.shape
    assert models["phase_code"](torch.tensor([0, 1, 2, 3])).shape == (4, cfg.phase_dim)


def test_generator_param_groups_are_disjoint_and_complete(fresh) -> None:
    _, models, opts = fresh
    ids = {name: {id(p) for p in opt.param_groups[0]["params"]} for name, opt in opts.items()}
    gen = {id(p) for part in GEN_PARTS for p in models[part].parameters()}
    assert ids["g"] == gen
    assert ids["d"] == {id(p) for p in models["discriminator"].parameters()}
    assert ids["det"] == {id(p) for p in models["detector"].parameters()}


def test_encoder_rejects_indivisible_patch() -> None:
    with pytest.raises(ValueError, match="not divisible by ViT patch 8"):
        SPEC.build_models(_cfg(), DataInfo(patch_size=(16, 16, 12), spacing=(1, 1, 1), window={}))
    with pytest.raises(ValueError, match="power of two, got 6"):
        unet_levels(6)


def test_generator_is_identity_at_init(fresh) -> None:
    cfg, models, _ = fresh
    x = _x()
    with torch.no_grad():
        for phase in (0, 3):
            out = steps.generate(models, x, torch.full((B,), phase))
            assert torch.equal(out, x)
            pred = SPEC.predict(models, x, cfg, {"target_phase": phase})
            assert torch.equal(pred, x.clamp(0, 1))
        wide = x * 3 - 1  # outside [0, 1]: predict clamps
        pred = SPEC.predict(models, wide, cfg, {"target_phase": 1})
        assert torch.equal(pred, wide.clamp(0, 1))


def test_target_phase_changes_the_output_once_trained() -> None:
    _, models, _ = _models()
    torch.manual_seed(3)
    with torch.no_grad():
        for part in GEN_PARTS:
            for p in models[part].parameters():
                p.add_(0.1 * torch.randn_like(p))
    x = _x()
    with torch.no_grad():
        outs = [steps.generate(models, x, torch.full((B,), k)) for k in range(4)]
    assert not torch.equal(outs[0], x)
    for i in range(4):
        for j in range(i + 1, 4):
            assert (outs[i] - outs[j]).abs().max() > 1e-4, (i, j)
    # per-sample conditioning: a mixed batch equals the single-phase batches row by row
    with torch.no_grad():
        mixed = steps.generate(models, x, torch.tensor([0, 3]))
    torch.testing.assert_close(mixed[0], outs[0][0])
    torch.testing.assert_close(mixed[1], outs[3][1])


def test_detector_outputs_logits_not_probabilities(fresh) -> None:
    _, models, _ = fresh
    with torch.no_grad():
        _, z = models["encoder"](_x())
        logits = models["detector"](z)
    assert logits.shape == (B, 4)
    assert not torch.allclose(logits.sum(1), torch.ones(B), atol=1e-3)
    assert (logits < 0).any()  # a softmax/sigmoid could never be negative


# --------------------------------------------------------------------------- schedule


def test_stage_schedule() -> None:
    cfg = _cfg(pretrain_epochs=2, gd_epochs=3, grl_epochs=1)
    stages = [steps.stage_at(e, cfg) for e in range(12)]
    assert stages == [
        "pretrain", "pretrain",
        "gd", "gd", "gd", "grl",
        "gd", "gd", "gd", "grl",
        "gd", "gd",
    ]  # fmt: skip


def test_stage_schedule_without_pretraining() -> None:
    cfg = _cfg(pretrain_epochs=0, gd_epochs=1, grl_epochs=2)
    assert [steps.stage_at(e, cfg) for e in range(6)] == ["gd", "grl", "grl"] * 2


@pytest.mark.parametrize("schedule", ["linear", "dann"])
def test_lambda_is_monotone_and_capped(schedule: str) -> None:
    cfg = _cfg(grl_schedule=schedule, grl_max=0.6, pretrain_epochs=2, grl_ramp_epochs=5)
    values = [steps.lambda_at(e, cfg) for e in range(15)]
    assert values[0] == values[1] == values[2] == 0.0  # before and at the start of the ramp
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert max(values) <= 0.6
    assert values[-1] == pytest.approx(0.6, abs=1e-4)
    if schedule == "linear":
        assert values[2:8] == pytest.approx([0.0, 0.12, 0.24, 0.36, 0.48, 0.6])


def test_lambda_constant_is_the_maximum() -> None:
    cfg = _cfg(grl_schedule="constant", grl_max=0.3)
    assert {steps.lambda_at(e, cfg) for e in range(10)} == {0.3}


# --------------------------------------------------------------------------- steps


def test_discriminator_step_does_not_reach_the_generator() -> None:
    cfg, models, opts = _models()
    ctx = _ctx(cfg, models, opts, epoch=1)
    for m in models.values():
        m.zero_grad(set_to_none=True)
    batch = _batch()
    real = batch["target"].unsqueeze(1)
    fake = steps.generate(models, batch["source"].unsqueeze(1), batch["target_phase"].long())
    assert fake.requires_grad
    disc_before = _snapshot(models["discriminator"])
    loss = discriminator_step(
        ctx.models["discriminator"],
        real,
        fake,
        lambda loss: ctx.optimize(loss, "d"),
        autocast=ctx.autocast,
    )
    assert isinstance(loss, float) and loss > 0 and torch.isfinite(torch.tensor(loss))
    for part in GEN_PARTS:
        for name, p in models[part].named_parameters():
            assert p.grad is None or not p.grad.any(), f"{part}.{name} got a gradient"
    grads = [p.grad for p in models["discriminator"].parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert _changed(models["discriminator"], disc_before)


def _run_stage(epoch: int, expected_stage: str):
    cfg, models, opts = _models()
    assert steps.stage_at(epoch, cfg) == expected_stage
    before = {name: _snapshot(m) for name, m in models.items()}
    logs = STAGE.train_step(_ctx(cfg, models, opts, epoch=epoch), _batch())
    assert logs, "train_step returned no losses"
    for key, value in logs.items():
        assert isinstance(value, float), key
        assert torch.isfinite(torch.tensor(value)), key
    changed = {name: _changed(m, before[name]) for name, m in models.items()}
    return cfg, models, logs, changed


def test_train_step_pretrain_updates_only_the_detector() -> None:
    _, _, logs, changed = _run_stage(0, "pretrain")
    assert set(logs) == {"loss/ce", "detector_acc"}
    assert 0.0 <= logs["detector_acc"] <= 1.0
    assert changed == {
        "encoder": False,
        "phase_code": False,
        "generator": False,
        "discriminator": False,
        "detector": True,
    }


def test_train_step_gd_updates_generator_and_discriminator() -> None:
    cfg, models, logs, changed = _run_stage(1, "gd")
    assert {"loss/g", "loss/l1", "loss/gan", "loss/d"} <= set(logs)
    # the generator loss is the weighted sum of its logged terms
    total = cfg.lambda_l1 * logs["loss/l1"] + cfg.lambda_gan * logs["loss/gan"]
    if "loss/identity" in logs:
        total += cfg.lambda_identity * logs["loss/identity"]
        assert logs["loss/identity"] == 0.0  # the output equals the input at init
    assert logs["loss/g"] == pytest.approx(total, rel=1e-5)
    assert changed["generator"] and changed["discriminator"]
    assert not changed["detector"]
    # the generator is no longer the identity
    x = _x()
    with torch.no_grad():
        assert not torch.equal(steps.generate(models, x, torch.tensor([1, 2])), x)


def test_train_step_grl_updates_encoder_and_detector_only() -> None:
    cfg, _, logs, changed = _run_stage(2, "grl")
    assert set(logs) == {"loss/ce", "detector_acc", "grl_lambda"}
    assert logs["grl_lambda"] == steps.lambda_at(2, cfg) > 0
    assert changed == {
        "encoder": True,
        "phase_code": False,
        "generator": False,
        "discriminator": False,
        "detector": True,
    }


def test_grl_step_reverses_the_encoder_gradient() -> None:
    """The encoder moves to *increase* the detector's loss, the detector to decrease it."""
    cfg, models, opts = _models(_cfg(grl_schedule="constant", grl_max=1.0, lr_g=1e-2))
    ctx = _ctx(cfg, models, opts, epoch=2)
    batch = _batch()
    x = batch["source"].unsqueeze(1)
    phase = batch["source_phase"].long()

    def ce() -> float:
        with torch.no_grad():
            _, z = models["encoder"](x)
            return float(torch.nn.functional.cross_entropy(models["detector"](z), phase))

    start = ce()
    det_state = {k: v.clone() for k, v in models["detector"].state_dict().items()}
    # Only the encoder's move: restore the detector after the step.
    STAGE.train_step(ctx, batch)
    models["detector"].load_state_dict(det_state)
    assert ce() > start


def test_eval_step_returns_per_sample_metrics(fresh) -> None:
    cfg, models, opts = fresh
    batch = _batch()
    with torch.no_grad():
        metrics = STAGE.eval_step(_ctx(cfg, models, opts, epoch=0), batch)
    for key in ("mae_hu", "psnr", "ssim", "detector_acc"):
        assert key in metrics
    for key in ("mae_hu", "psnr", "ssim"):
        assert "identity_" + key in metrics
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor), key
        assert value.shape == (B,), key
    assert set(metrics["detector_acc"].tolist()) <= {0.0, 1.0}
    # generator is the identity at init: model metrics equal the identity baseline
    for key in ("mae_hu", "psnr", "ssim", "roi_liver_hu"):
        torch.testing.assert_close(metrics[key], metrics["identity_" + key])
    # MAE in HU inside the body, by hand
    x, truth = batch["source"], batch["truth"]
    body = batch["labels"] > 0
    want = torch.stack([((x[i] - truth[i]).abs() * 2000)[body[i]].mean() for i in range(B)])
    torch.testing.assert_close(metrics["mae_hu"], want)
    # aorta present (>= 8 voxels) only in sample 0
    aorta = metrics["roi_aorta_hu"]
    assert torch.isfinite(aorta[0]) and torch.isnan(aorta[1])


def test_preview_returns_3d_volumes(fresh) -> None:
    cfg, models, _ = fresh
    batch = _batch()
    with torch.no_grad():
        src, pred, truth = STAGE.preview(models, batch, cfg)
    assert src.shape == pred.shape == truth.shape == (16, 16, 16)
    assert torch.equal(src, batch["source"][0])
    assert torch.equal(truth, batch["truth"][0])
    assert torch.equal(pred, src)  # identity at init
