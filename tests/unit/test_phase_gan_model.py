"""Phase-GAN networks and steps on tiny CPU shapes: shapes, identity init, gradient routing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ctray.config import from_dict, replace
from ctray.data.nifti import HUWindow
from ctray.families.phase_gan import steps
from ctray.families.phase_gan.config import PhaseGANConfig
from ctray.families.phase_gan.model import unet_levels
from ctray.nn.gan import discriminator_step, last_logits
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
        label=batch["target_phase"].long(),
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


def test_train_step_gd_updates_generator_discriminator_and_detector() -> None:
    cfg, models, logs, changed = _run_stage(1, "gd")
    assert {"loss/g", "loss/rec", "loss/gan", "loss/d", "loss/ce", "loss/organ"} <= set(logs)
    assert "grl_lambda" in logs
    # the generator loss is the weighted sum of its logged terms
    total = (
        cfg.lambda_rec * logs["loss/rec"]
        + cfg.lambda_gan * logs["loss/gan"]
        + cfg.lambda_identity * logs["loss/identity"]
        + cfg.lambda_ce * logs["loss/ce"]
        + cfg.lambda_organ * logs["loss/organ"]
    )
    assert logs["loss/identity"] == 0.0  # the output equals the input at init
    assert logs["loss/g"] == pytest.approx(total, rel=1e-5)
    # the detector learns in the same step (DANN); the encoder only once the zero-initialised
    # output head and λ (0 at the start of the ramp) let gradients through
    assert changed["generator"] and changed["discriminator"] and changed["detector"], changed
    # the generator is no longer the identity
    x = _x()
    with torch.no_grad():
        assert not torch.equal(steps.generate(models, x, torch.tensor([1, 2])), x)


def test_train_step_grl_epoch_updates_only_the_detector() -> None:
    _, _, logs, changed = _run_stage(2, "grl")
    assert set(logs) == {"loss/ce", "detector_acc"}
    assert changed == {
        "encoder": False,
        "phase_code": False,
        "generator": False,
        "discriminator": False,
        "detector": True,
    }


def _phase_only_cfg(**overrides) -> PhaseGANConfig:
    """Only the (reversed) phase term in the generator step."""
    return _cfg(
        grl_schedule="constant", lambda_rec=0.0, lambda_gan=0.0, lambda_identity=0.0, **overrides
    )


def test_grl_scales_the_reversed_encoder_gradient_by_lambda() -> None:
    """In the generator step the encoder's gradient is -λ * lambda_ce * d(CE)/d(encoder)."""
    grads = {}
    for lam in (0.25, 1.0):
        cfg, models, opts = _models(_phase_only_cfg(grl_max=lam, lambda_ce=2.0))
        ctx = _ctx(cfg, models, opts, epoch=1)
        ctx.optimize = lambda loss, *names: loss.backward()  # gradients only, no step
        STAGE.train_step(ctx, _batch())
        grads[lam] = torch.cat([p.grad.flatten() for p in models["encoder"].parameters()
                                if p.grad is not None])  # fmt: skip
    cfg, models, _ = _models(_phase_only_cfg())
    batch = _batch()
    grid, _ = models["encoder"](batch["source"].unsqueeze(1))
    ce = steps.token_ce(models["detector"](steps.tokens_of(grid)), batch["source_phase"].long())
    ce.backward()
    plain = torch.cat(
        [p.grad.flatten() for p in models["encoder"].parameters() if p.grad is not None]
    )
    for lam, grad in grads.items():
        torch.testing.assert_close(grad, -lam * 2.0 * plain, rtol=1e-4, atol=1e-8)


def test_gd_step_moves_the_encoder_against_the_detector() -> None:
    """With only the phase term, the encoder moves to *increase* the detector's loss."""
    cfg, models, opts = _models(_phase_only_cfg(grl_max=1.0, lr_g=1e-2))
    ctx = _ctx(cfg, models, opts, epoch=1)
    batch = _batch()
    x = batch["source"].unsqueeze(1)
    phase = batch["source_phase"].long()

    def ce() -> float:
        with torch.no_grad():
            grid, _ = models["encoder"](x)
            return float(steps.token_ce(models["detector"](steps.tokens_of(grid)), phase))

    start = ce()
    det_state = {k: v.clone() for k, v in models["detector"].state_dict().items()}
    STAGE.train_step(ctx, batch)
    models["detector"].load_state_dict(det_state)  # only the encoder's move
    assert ce() > start


def test_lr_schedule_is_cosine_after_pretraining() -> None:
    cfg = _cfg(pretrain_epochs=1, lr_schedule="cosine")
    factors = [steps.lr_factor(e, 5, cfg) for e in range(5)]
    assert factors[0] == factors[1] == 1.0
    assert factors == sorted(factors, reverse=True)
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert steps.lr_factor(4, 5, _cfg(lr_schedule="constant")) == 1.0
    cfg, models, opts = _models(cfg)
    ctx = _ctx(cfg, models, opts, epoch=4)
    ctx.num_epochs = 5
    STAGE.train_step(ctx, _batch())
    assert opts["g"].param_groups[0]["lr"] == pytest.approx(cfg.lr_g * factors[-1])


def test_change_weights_emphasise_voxels_that_change() -> None:
    cfg = _cfg(rec_change_weight=3.0)
    window = HUWindow(lo=-1000, hi=1000)
    x = torch.full((1, 1, 8, 8, 8), 0.5)
    target = x.clone()
    target[..., 2:7, 2:7, 2:7] += 150 / 2000  # +150 HU in a block
    w = steps.change_weights(x, target, cfg, window)
    assert float(w[0, 0, 4, 4, 4]) == pytest.approx(4.0)  # inside: the full extra weight
    assert float(w[0, 0, 0, 0, 0]) == pytest.approx(1.0)  # far away: none
    assert float(steps.reconstruction_loss(target, target, cfg, window, w)) == 0.0


def test_organ_mean_loss_sees_organ_offsets_not_noise() -> None:
    from ctray.metrics import LABEL_CLASSES

    torch.manual_seed(0)
    labels = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    labels[:, :, :4] = LABEL_CLASSES["aorta"]
    labels[1, :, 4:] = LABEL_CLASSES["liver"]
    labels[0, :, 4:, 0, 0] = LABEL_CLASSES["liver"]  # 4 voxels: too few to count
    target = torch.full((2, 1, 8, 8, 8), 0.5)
    noisy = target + 0.02 * torch.randn_like(target)
    zero_mean_noise = noisy - noisy.mean(dim=(2, 3, 4), keepdim=True) + 0.5
    offset = target.clone()
    offset[labels == LABEL_CLASSES["aorta"]] += 0.1

    # per-organ zero-mean noise costs (almost) nothing; an organ offset costs its square
    assert float(steps.organ_mean_loss(zero_mean_noise, target, labels)) < 1e-4
    # (sample, organ) pairs present: aorta x2, liver x1 (the 4-voxel liver does not count)
    assert float(steps.organ_mean_loss(offset, target, labels)) == pytest.approx(0.01 * 2 / 3)
    # organs absent everywhere: no loss, no NaN
    assert float(steps.organ_mean_loss(offset, target, torch.zeros_like(labels))) == 0.0


def test_conditional_discriminator_depends_on_the_phase() -> None:
    _, models, _ = _models()
    disc = models["discriminator"]
    with torch.no_grad():
        disc.embed.weight.normal_()
        x = _x()
        a = last_logits(disc(x, torch.tensor([0, 0])))
        b = last_logits(disc(x, torch.tensor([1, 1])))
    assert a.shape == b.shape and a.shape[:2] == (B, 1)
    assert not torch.allclose(a, b)


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
    # per target phase: every phase has every key, NaN for samples of other phases
    # (targets are venous, delayed)
    for phase in ("arterial", "venous", "delayed", "native"):
        for key in ("mae_hu", "roi_aorta_hu", "balanced_mae_hu"):
            assert f"{phase}/{key}" in metrics and f"{phase}/identity_{key}" in metrics
    torch.testing.assert_close(metrics["venous/mae_hu"][0], metrics["mae_hu"][0])
    assert torch.isnan(metrics["venous/mae_hu"][1])
    torch.testing.assert_close(metrics["delayed/identity_mae_hu"][1], metrics["identity_mae_hu"][1])
    assert torch.isnan(metrics["arterial/mae_hu"]).all()
    # balanced: mean of the organ-wise MAE and the MAE in the rest of the body
    for i in range(B):
        body = batch["labels"][i] == 1
        liver = batch["labels"][i] == 4
        err = (x[i] - truth[i]).abs() * 2000
        organs = [err[liver].mean()]
        if i == 0:
            organs.append(err[batch["labels"][i] == 2].mean())
        want = 0.5 * (torch.stack(organs).mean() + err[body].mean())
        torch.testing.assert_close(metrics["identity_balanced_mae_hu"][i], want)


def test_preview_returns_3d_volumes(fresh) -> None:
    cfg, models, _ = fresh
    batch = _batch()
    with torch.no_grad():
        src, pred, truth = STAGE.preview(models, batch, cfg)
    assert src.shape == pred.shape == truth.shape == (16, 16, 16)
    assert torch.equal(src, batch["source"][0])
    assert torch.equal(truth, batch["truth"][0])
    assert torch.equal(pred, src)  # identity at init
