"""Build, train, evaluate and predict for the phase GAN; the generic loop calls these.

Fixes over the seed: logits into CrossEntropyLoss and BCEWithLogitsLoss (no Softmax/Sigmoid);
the discriminator trains on a detached fake, so its step never reaches the generator; the
GRL blocks update the encoder through the reversed gradient (in the seed only the detector
stepped, so the reversal had no effect); every schedule constant is configurable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from monai.networks.nets import PatchDiscriminator

from ctray.data.nifti import HUWindow
from ctray.metrics import image_metrics
from ctray.nn.gan import discriminator_step, gan_loss, last_logits
from ctray.nn.grl import grad_reverse, grl_lambda
from ctray.registry import Batch, DataInfo, Models, Optimizers, StepContext

from .config import PhaseGANConfig
from .model import PhaseCode, PhaseDetector, PhaseGenerator, ViTEncoder, unet_levels

Stage = Literal["pretrain", "gd", "grl"]


def stage_at(epoch: int, cfg: PhaseGANConfig) -> Stage:
    """Which block of the schedule an epoch belongs to."""
    if epoch < cfg.pretrain_epochs:
        return "pretrain"
    cycle = cfg.gd_epochs + cfg.grl_epochs
    return "gd" if (epoch - cfg.pretrain_epochs) % cycle < cfg.gd_epochs else "grl"


def warmup_epochs(cfg: PhaseGANConfig) -> int:
    """Detector pre-training epochs: the generator is still the identity during them."""
    return cfg.pretrain_epochs


def lambda_at(epoch: int, cfg: PhaseGANConfig) -> float:
    """GRL strength at an epoch: the schedule's value at its progress through the ramp."""
    progress = (epoch - cfg.pretrain_epochs) / max(cfg.grl_ramp_epochs, 1)
    return grl_lambda(cfg.grl_schedule, progress, maximum=cfg.grl_max, gamma=cfg.grl_gamma)


def build_models(cfg: PhaseGANConfig, data: DataInfo) -> Models:
    encoder = ViTEncoder(
        img_size=data.patch_size,
        patch=cfg.vit_patch,
        hidden=cfg.vit_hidden,
        mlp=cfg.vit_mlp,
        layers=cfg.vit_layers,
        heads=cfg.vit_heads,
    )
    return {
        "encoder": encoder,
        "phase_code": PhaseCode(cfg.phase_dim),
        "generator": PhaseGenerator(
            levels=unet_levels(cfg.vit_patch),
            channels=cfg.gen_channels,
            token_dim=cfg.vit_hidden,
            cond_dim=cfg.phase_dim,
        ),
        "discriminator": PatchDiscriminator(
            spatial_dims=3,
            channels=cfg.disc_channels,
            in_channels=1,
            num_layers_d=cfg.disc_layers,
            norm="INSTANCE",
        ),
        "detector": PhaseDetector(cfg.vit_hidden),
    }


def init_pretrained(cfg: PhaseGANConfig, models: Models) -> None:
    """Training-time hook: load a pretrained ViT state dict (weights only) into the encoder."""
    if cfg.pretrained:
        state = torch.load(cfg.pretrained, map_location="cpu", weights_only=True)
        models["encoder"].vit.load_state_dict(state, strict=False)


def build_optimizers(cfg: PhaseGANConfig, models: Models) -> Optimizers:
    betas = (cfg.beta1, 0.999)
    gen_params = [
        *models["encoder"].parameters(),
        *models["phase_code"].parameters(),
        *models["generator"].parameters(),
    ]
    return {
        "g": torch.optim.Adam(gen_params, lr=cfg.lr_g, betas=betas),
        "d": torch.optim.Adam(models["discriminator"].parameters(), lr=cfg.lr_d, betas=betas),
        "det": torch.optim.Adam(models["detector"].parameters(), lr=cfg.lr_det, betas=betas),
    }


def _volume(batch: Batch, key: str, device: torch.device) -> torch.Tensor:
    return batch[key].to(device=device, dtype=torch.float32).unsqueeze(1)


def generate(models: Models, x: torch.Tensor, target_phase: torch.Tensor) -> torch.Tensor:
    """Translate normalised patches ``x`` (B, 1, *patch) to ``target_phase`` (B,)."""
    grid, _ = models["encoder"](x)
    return models["generator"](x, grid, models["phase_code"](target_phase))


def semi_paired_l1(pred: torch.Tensor, target: torch.Tensor, pool: int) -> torch.Tensor:
    """L1 between local means (``pool``^3 voxels): robust to small misalignment of phases."""
    if pool > 1:
        pred, target = F.avg_pool3d(pred, pool), F.avg_pool3d(target, pool)
    return F.l1_loss(pred, target)


def train_step(ctx: StepContext, batch: Batch) -> dict[str, float]:
    cfg: PhaseGANConfig = ctx.config
    m = ctx.models
    x = _volume(batch, "source", ctx.device)
    src_phase = batch["source_phase"].to(ctx.device).long()
    stage = stage_at(ctx.epoch, cfg)

    if stage == "pretrain":
        with ctx.autocast():
            with torch.no_grad():
                _, z = m["encoder"](x)
            logits = m["detector"](z.float())
            loss = F.cross_entropy(logits, src_phase)
        ctx.optimize(loss, "det")
        acc = (logits.argmax(1) == src_phase).float().mean()
        return {"loss/ce": float(loss.detach()), "detector_acc": float(acc)}

    if stage == "grl":
        lam = lambda_at(ctx.epoch, cfg)
        with ctx.autocast():
            _, z = m["encoder"](x)
            logits = m["detector"](grad_reverse(z, lam))
            loss = cfg.lambda_ce * F.cross_entropy(logits, src_phase)
        ctx.optimize(loss, "det", "g")
        acc = (logits.argmax(1) == src_phase).float().mean()
        return {"loss/ce": float(loss.detach()), "detector_acc": float(acc), "grl_lambda": lam}

    y = _volume(batch, "target", ctx.device)
    tgt_phase = batch["target_phase"].to(ctx.device).long()
    with ctx.autocast():
        fake = generate(m, x, tgt_phase)
        loss_gan = gan_loss(last_logits(m["discriminator"](fake)), True)
        loss_l1 = semi_paired_l1(fake.float(), y, cfg.l1_pool)
        loss_idt = F.l1_loss(fake.float(), x)
        loss_g = (
            cfg.lambda_l1 * loss_l1 + cfg.lambda_identity * loss_idt + cfg.lambda_gan * loss_gan
        )
    ctx.optimize(loss_g, "g")
    loss_d = discriminator_step(
        m["discriminator"], y, fake, lambda loss: ctx.optimize(loss, "d"), autocast=ctx.autocast
    )
    return {
        "loss/g": float(loss_g.detach()),
        "loss/l1": float(loss_l1.detach()),
        "loss/gan": float(loss_gan.detach()),
        "loss/identity": float(loss_idt.detach()),
        "loss/d": loss_d,
    }


def eval_step(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """Model and identity-baseline metrics against the aligned truth, plus detector accuracy."""
    m = ctx.models
    window = HUWindow(**ctx.data.window)
    x = _volume(batch, "source", ctx.device)
    truth = _volume(batch, "truth", ctx.device)
    labels = batch["labels"].to(ctx.device).unsqueeze(1)
    tgt_phase = batch["target_phase"].to(ctx.device).long()
    src_phase = batch["source_phase"].to(ctx.device).long()
    with ctx.autocast():
        grid, z = m["encoder"](x)
        pred = m["generator"](x, grid, m["phase_code"](tgt_phase)).float().clamp(0, 1)
        detected = m["detector"](z).argmax(1)
    metrics = image_metrics(pred, truth, labels, window)
    metrics.update(image_metrics(x, truth, labels, window, prefix="identity_"))
    metrics["detector_acc"] = (detected == src_phase).float()
    return metrics


def predict(
    models: Models, x: torch.Tensor, cfg: PhaseGANConfig, cond: Mapping[str, Any]
) -> torch.Tensor:
    phase = torch.as_tensor(cond["target_phase"], device=x.device).long().expand(x.shape[0])
    return generate(models, x, phase).clamp(0, 1)


def preview(models: Models, batch: Batch, cfg: PhaseGANConfig) -> tuple[torch.Tensor, ...]:
    device = next(models["generator"].parameters()).device
    x = _volume(batch, "source", device)[:1]
    pred = predict(models, x, cfg, {"target_phase": batch["target_phase"][:1].to(device)})
    return x[0, 0], pred[0, 0], _volume(batch, "truth", device)[0, 0]
