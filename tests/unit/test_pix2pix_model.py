"""pix2pix networks and steps: U-Net depths, the conditional PatchGAN, D step, LR schedule."""

from __future__ import annotations

import pytest
import torch

from ctray.config import from_dict
from ctray.families.pix2pix.config import Pix2PixConfig
from ctray.families.pix2pix.model import UNetGenerator, patch_discriminator
from ctray.families.pix2pix.spec import SPEC
from ctray.families.pix2pix.steps import lr_at
from ctray.nn.gan import discriminator_step, gan_loss, last_logits
from ctray.optim import constant_then_linear
from ctray.registry import DataInfo
from ctray.train.local import local_context
from ctray.train.optimization import Optimization

WINDOW = {"lo": -1000.0, "hi": 1000.0}


def _data(size: int) -> DataInfo:
    return DataInfo(patch_size=(size, size, 1), spacing=(1.0, 1.0, 1.0), window=WINDOW)


@pytest.mark.parametrize(("name", "size"), [("unet_256", 256), ("unet_512", 512)])
def test_generator_depths_keep_the_slice_shape(name: str, size: int) -> None:
    cfg = Pix2PixConfig(generator=name, ngf=4, ndf=4)
    models = SPEC.build_models(cfg, _data(size))
    gen = models["generator"].eval()
    assert gen.depth == {"unet_256": 8, "unet_512": 9}[name]
    with torch.no_grad():
        y = gen(torch.rand(1, 1, size, size))
    assert y.shape == (1, 1, size, size) and y.min() >= 0 and y.max() <= 1
    dropouts = [m for m in gen.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == gen.depth - 5 and all(d.p == 0.5 for d in dropouts)


def test_depth_too_deep_for_the_slices_is_refused() -> None:
    with pytest.raises(ValueError, match="multiples of 256"):
        SPEC.build_models(Pix2PixConfig(ngf=4, ndf=4), _data(128))
    assert SPEC.build_models(Pix2PixConfig(ngf=4, depth=6), _data(128))["generator"].depth == 6
    for bottleneck, depth in ((1, 7), (2, 6), (4, 5)):
        cfg = Pix2PixConfig(ngf=4, bottleneck=bottleneck)
        assert SPEC.build_models(cfg, _data(128))["generator"].depth == depth
    with pytest.raises(ValueError, match="bottleneck 3"):
        SPEC.build_models(Pix2PixConfig(ngf=4, bottleneck=3), _data(128))


def test_residual_generator_starts_as_the_identity() -> None:
    gen = UNetGenerator(depth=5, ngf=4, residual=True, norm="instance").eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(gen(x), x)
    # every tensor once in the state dict (safetensors refuses shared storage)
    ptrs = [t.data_ptr() for t in gen.state_dict().values()]
    assert len(ptrs) == len(set(ptrs))


def test_discriminator_is_conditioned_on_the_input() -> None:
    torch.manual_seed(0)
    disc = patch_discriminator(ndf=8, layers=3, norm="instance").eval()
    first = next(disc.parameters())
    assert first.shape[1] == 2  # (input, output) as two channels
    out, x1, x2 = torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        d1 = last_logits(disc(torch.cat((x1, out), dim=1)))
        d2 = last_logits(disc(torch.cat((x2, out), dim=1)))
    assert d1.shape[1] == 1 and d1.shape[-1] > 1  # a grid of patch logits
    assert not torch.allclose(d1, d2)


def test_discriminator_step_does_not_reach_the_generator() -> None:
    gen = UNetGenerator(depth=5, ngf=4, norm="instance")
    disc = patch_discriminator(ndf=4, layers=2, norm="instance")
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    x, y = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    fake = gen(x)
    before = [p.detach().clone() for p in disc.parameters()]
    optimize = Optimization({"d": opt})
    loss = discriminator_step(
        disc, torch.cat((x, y), 1), torch.cat((x, fake), 1), lambda loss: optimize(loss, "d")
    )
    assert loss > 0
    assert all(p.grad is None for p in gen.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters(), strict=True))


def test_gan_modes() -> None:
    logits = torch.zeros(2, 1, 4, 4)
    assert gan_loss(logits, True, "vanilla").item() == pytest.approx(0.6931, abs=1e-4)
    assert gan_loss(logits, True, "lsgan").item() == pytest.approx(1.0)
    assert gan_loss(logits, False, "lsgan").item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="gan_mode"):
        gan_loss(logits, True, "wgan")  # type: ignore[arg-type]


def test_lr_is_constant_then_decays_linearly() -> None:
    factors = [constant_then_linear(e, 10, 4) for e in range(10)]
    assert factors[:6] == [1.0] * 6
    assert factors[6:] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    cfg = Pix2PixConfig(lr=2e-4, decay_fraction=0.5)
    assert lr_at(0, 200, cfg) == lr_at(99, 200, cfg) == pytest.approx(2e-4)
    assert lr_at(100, 200, cfg) == pytest.approx(2e-4 * (1 - 1 / 101))
    assert lr_at(199, 200, cfg) == pytest.approx(2e-4 / 101)


def test_train_step_sets_the_lr_and_trains_both_nets() -> None:
    cfg = from_dict(Pix2PixConfig, SPEC.preset("debug"))
    data = _data(32)
    models = SPEC.build_models(cfg, data)
    opts = SPEC.final.build_optimizers(cfg, models)
    ctx = local_context(SPEC, cfg, data, models=models, optimizers=opts, epoch=3, num_epochs=4)
    batch = {
        "a": torch.rand(2, 32, 32),
        "b": torch.rand(2, 32, 32),
        "labels": torch.ones(2, 32, 32, dtype=torch.uint8),
    }
    losses = SPEC.final.train_step(ctx, batch)
    assert {"loss/g", "loss/gan", "loss/l1", "loss/d", "lr"} <= set(losses)
    assert losses["lr"] == pytest.approx(cfg.lr / 3)
    assert all(g["lr"] == losses["lr"] for o in opts.values() for g in o.param_groups)
    with torch.no_grad():
        metrics = SPEC.final.eval_step(ctx, batch)
    for key in ("mae_hu", "psnr", "ssim", "identity_mae_hu", "identity_psnr", "identity_ssim"):
        assert metrics[key].shape == (2,)


def test_predict_accepts_sliding_window_slices() -> None:
    cfg = from_dict(Pix2PixConfig, SPEC.preset("debug"))
    models = {k: m.eval() for k, m in SPEC.build_models(cfg, _data(32)).items()}
    x = torch.rand(3, 1, 32, 32, 1)
    with torch.no_grad():
        y = SPEC.predict(models, x, cfg, {})
        assert y.shape == x.shape
        assert torch.equal(y[..., 0], SPEC.predict(models, x[..., 0], cfg, {}))
