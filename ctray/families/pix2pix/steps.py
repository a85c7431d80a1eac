"""Build, train, evaluate and predict for pix2pix; the generic loop calls these.

Each step: the LR follows pix2pix's constant-then-linear policy (set from the epoch, so resumes
need no scheduler state); D trains on (A, B) vs (A, G(A)) with the fake detached, in one forward
pass; then G minimises the GAN loss plus lambda_L1 * L1 to B. Fixes over the seed: HU stay in a
recorded window (the seed rescaled each slice to [0, 255], losing HU), and the metrics are HU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ctray.data.nifti import HUWindow
from ctray.metrics import image_metrics
from ctray.nn.gan import discriminator_step, gan_loss, last_logits
from ctray.optim import constant_then_linear, set_lr
from ctray.registry import Batch, DataInfo, Models, Optimizers, StepContext

from .config import Pix2PixConfig
from .model import UNetGenerator, patch_discriminator


def build_models(cfg: Pix2PixConfig, data: DataInfo) -> Models:
    size = tuple(data.patch_size)
    if len(size) == 3 and size[2] != 1:
        raise ValueError(f"pix2pix trains on 2D slices: patch_size must be (H, W, 1), got {size}")
    depth = cfg.num_downs(min(size[:2]))
    if size[0] % 2**depth or size[1] % 2**depth:
        raise ValueError(
            f"a U-Net of depth {depth} needs slices that are multiples of {2**depth} px, got "
            f"{size[:2]}; use resize_to 256 (unet_256) / 512 (unet_512), or set depth or "
            "bottleneck (e.g. bottleneck=1 fits any power-of-2 size)"
        )
    return {
        "generator": UNetGenerator(
            depth=depth,
            ngf=cfg.ngf,
            norm=cfg.norm,
            dropout=cfg.dropout,
            residual=cfg.residual,
        ),
        "discriminator": patch_discriminator(ndf=cfg.ndf, layers=cfg.disc_layers, norm=cfg.norm),
    }


def build_optimizers(cfg: Pix2PixConfig, models: Models) -> Optimizers:
    betas = (cfg.beta1, 0.999)
    return {
        "g": torch.optim.Adam(models["generator"].parameters(), lr=cfg.lr, betas=betas),
        "d": torch.optim.Adam(models["discriminator"].parameters(), lr=cfg.lr, betas=betas),
    }


def lr_at(epoch: int, num_epochs: int, cfg: Pix2PixConfig) -> float:
    """The learning rate of an epoch: constant, then linear decay over decay_fraction."""
    decay = round(cfg.decay_fraction * num_epochs)
    return cfg.lr * constant_then_linear(epoch, num_epochs, decay)


def _slices(batch: Batch, key: str, device: torch.device) -> torch.Tensor:
    return batch[key].to(device=device, dtype=torch.float32).unsqueeze(1)


def train_step(ctx: StepContext, batch: Batch) -> dict[str, float]:
    cfg: Pix2PixConfig = ctx.config
    gen, disc, opt = ctx.models["generator"], ctx.models["discriminator"], ctx.optimizers
    lr = lr_at(ctx.epoch, ctx.num_epochs, cfg)
    set_lr(opt.values(), lr)
    x, y = _slices(batch, "a", ctx.device), _slices(batch, "b", ctx.device)
    with ctx.autocast():
        fake = gen(x)
    loss_d = discriminator_step(
        disc,
        torch.cat((x, y), dim=1),
        torch.cat((x, fake), dim=1),
        lambda loss: ctx.optimize(loss, "d"),
        mode=cfg.gan_mode,
        autocast=ctx.autocast,
    )
    with ctx.autocast():
        loss_gan = gan_loss(last_logits(disc(torch.cat((x, fake), dim=1))), True, cfg.gan_mode)
        loss_l1 = F.l1_loss(fake.float(), y)
        loss_g = loss_gan + cfg.lambda_l1 * loss_l1
    ctx.optimize(loss_g, "g")
    return {
        "loss/g": float(loss_g.detach()),
        "loss/gan": float(loss_gan.detach()),
        "loss/l1": float(loss_l1.detach()),
        "loss/d": loss_d,
        "lr": lr,
    }


def eval_step(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """Per-slice MAE (HU, inside the body), PSNR, SSIM for G(A) and for A itself (identity)."""
    window = HUWindow(**ctx.data.window)
    x, y = _slices(batch, "a", ctx.device), _slices(batch, "b", ctx.device)
    labels = batch["labels"].to(ctx.device).unsqueeze(1)
    with ctx.autocast():
        pred = ctx.models["generator"](x).float().clamp(0, 1)
    metrics = image_metrics(pred, y, labels, window, organs=())
    metrics.update(image_metrics(x, y, labels, window, prefix="identity_", organs=()))
    return metrics


def predict(
    models: Models, x: torch.Tensor, cfg: Pix2PixConfig, cond: Mapping[str, Any]
) -> torch.Tensor:
    """(B, 1, H, W) slices, or (B, 1, H, W, 1) windows from a 3D sliding-window inferer."""
    if x.ndim == 5:
        if x.shape[-1] != 1:
            raise ValueError(f"pix2pix predicts single slices, got windows of {tuple(x.shape)}")
        return predict(models, x[..., 0], cfg, cond).unsqueeze(-1)
    return models["generator"](x).clamp(0, 1)


def preview(models: Models, batch: Batch, cfg: Pix2PixConfig) -> tuple[torch.Tensor, ...]:
    """One slice as (H, W, 1) volumes, so the generic montage shows it in its axial column."""
    device = next(models["generator"].parameters()).device
    x = _slices(batch, "a", device)[:1]
    pred = predict(models, x, cfg, {})
    return x[0, 0, ..., None], pred[0, 0, ..., None], _slices(batch, "b", device)[0, 0, ..., None]
