"""Build, train, evaluate and predict for the phase GAN; the generic loop calls these.

Fixes over the seed: logits into CrossEntropyLoss and BCEWithLogitsLoss (no Softmax/Sigmoid);
the discriminator trains on a detached fake, so its step never reaches the generator; every
schedule constant is configurable. Fixes that make training beat the identity (issue 7):

* the reconstruction term compares the output with the target phase *registered onto the
  source* (data builder), voxel-wise, with a squared error: an L1 against an unaligned or
  pooled target has its minimum at "change nothing" (background voxels pull with a constant
  force towards the input, the few enhancing voxels cannot outweigh them);
* the discriminator is conditioned on the target phase (projection), so a realistic image of
  the wrong phase is penalised;
* the gradient reversal acts inside the generator step (DANN), on every ViT token the generator
  reads, weighed against the image losses; in separate GRL-only epochs Adam rescales the
  reversed gradient to a full-size step whatever λ is, so λ meant nothing;
* learning rates follow a cosine decay over the epochs after pre-training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ctray.data.nifti import HUWindow
from ctray.data.phases import PHASES
from ctray.metrics import LABEL_CLASSES, MIN_ROI_VOXELS, ROI_ORGANS, image_metrics, split_by_group
from ctray.nn.gan import ProjectionPatchDiscriminator, discriminator_step, gan_loss, last_logits
from ctray.nn.grl import grad_reverse, grl_lambda
from ctray.registry import Batch, DataInfo, Models, Optimizers, StepContext

from .config import PhaseGANConfig
from .model import PhaseCode, PhaseDetector, PhaseGenerator, ViTEncoder, unet_levels

Stage = Literal["pretrain", "gd", "grl"]

# Extra generator inputs (HU): abdominal soft-tissue window W400/L40 and an enhanced-vessel
# window W400/L300.
GEN_WINDOWS_HU: tuple[tuple[float, float], ...] = ((-160.0, 240.0), (100.0, 500.0))
# The reconstruction and identity terms are computed on HU / REC_SCALE_HU.
REC_SCALE_HU = 100.0
HUBER_DELTA = 0.25  # in REC_SCALE_HU units: 25 HU
CHANGE_FULL_WEIGHT_HU = 100.0  # a local change this large gets the full extra weight


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


def lr_factor(epoch: int, num_epochs: int, cfg: PhaseGANConfig) -> float:
    """Learning-rate multiplier at an epoch: 1 in pre-training, then the ``lr_schedule``."""
    if cfg.lr_schedule == "constant" or epoch < cfg.pretrain_epochs:
        return 1.0
    progress = (epoch - cfg.pretrain_epochs) / max(num_epochs - cfg.pretrain_epochs, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _set_learning_rates(ctx: StepContext, cfg: PhaseGANConfig) -> None:
    factor = lr_factor(ctx.epoch, ctx.num_epochs, cfg)
    base = {"g": cfg.lr_g, "d": cfg.lr_d, "det": cfg.lr_det}
    for name, opt in ctx.optimizers.items():
        for group in opt.param_groups:
            group["lr"] = base[name] * factor


def gen_windows(window: Mapping[str, float]) -> tuple[tuple[float, float], ...]:
    """GEN_WINDOWS_HU in the normalised units of the data's HU window."""
    w = HUWindow(**window)
    return tuple(
        ((lo - w.lo) / (w.hi - w.lo), (hi - w.lo) / (w.hi - w.lo)) for lo, hi in GEN_WINDOWS_HU
    )


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
            windows=gen_windows(data.window) if cfg.gen_windows else (),
        ),
        "discriminator": ProjectionPatchDiscriminator(
            spatial_dims=3,
            channels=cfg.disc_channels,
            in_channels=1,
            num_layers_d=cfg.disc_layers,
            num_classes=len(PHASES),
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


def tokens_of(grid: torch.Tensor) -> torch.Tensor:
    """The ViT token grid (B, C, *g) as a token sequence (B, N, C)."""
    return grid.flatten(2).transpose(1, 2)


def token_ce(logits: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of per-token logits (B, N, P) against one phase per sample (B,)."""
    return F.cross_entropy(logits.flatten(0, 1), phase.repeat_interleave(logits.shape[1]))


def detect(models: Models, grid: torch.Tensor) -> torch.Tensor:
    """Phase logits (B, P) of a token grid: the mean of the per-token logits."""
    return models["detector"](tokens_of(grid).float()).mean(dim=1)


def change_weights(
    x: torch.Tensor, target: torch.Tensor, cfg: PhaseGANConfig, window: HUWindow
) -> torch.Tensor:
    """Per-voxel loss weights ``1 + rec_change_weight * min(|local mean change| / 100 HU, 1)``.

    Contrast changes a small share of the voxels (a vessel is a fraction of a percent of a
    patch); the noise of the target everywhere else dominates the gradient. The change is
    averaged over 3^3 voxels first, so the target's noise hardly moves the weights.
    """
    change = F.avg_pool3d(target - x, 3, stride=1, padding=1, count_include_pad=False).abs()
    change_hu = change * (window.hi - window.lo)
    return 1.0 + cfg.rec_change_weight * (change_hu / CHANGE_FULL_WEIGHT_HU).clamp(max=1.0)


def reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    cfg: PhaseGANConfig,
    window: HUWindow,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rec_loss`` between output and (registered) target, on HU / REC_SCALE_HU."""
    scale = (window.hi - window.lo) / REC_SCALE_HU
    if cfg.rec_pool > 1:
        pred, target = F.avg_pool3d(pred, cfg.rec_pool), F.avg_pool3d(target, cfg.rec_pool)
        weight = None if weight is None else F.avg_pool3d(weight, cfg.rec_pool)
    pred, target = pred * scale, target * scale
    if cfg.rec_loss == "mse":
        err = F.mse_loss(pred, target, reduction="none")
    elif cfg.rec_loss == "huber":
        err = F.huber_loss(pred, target, delta=HUBER_DELTA, reduction="none")
    else:
        err = F.l1_loss(pred, target, reduction="none")
    if weight is None:
        return err.mean()
    return (err * weight).sum() / weight.sum()


def organ_mean_loss(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Squared error of each organ's mean value, averaged over the (sample, organ) pairs present.

    What a contrast phase changes is mostly each organ's mean HU. In a voxel loss those few
    organ offsets compete with every voxel's noise and edges; organ means average the target's
    noise away, so this term says directly "the aorta is 250 HU brighter". ``labels`` are the
    training rows' organ labels (available when training only: the model never needs them).
    """
    classes = torch.tensor([LABEL_CLASSES[o] for o in ROI_ORGANS], device=labels.device)
    onehot = (labels == classes.reshape(1, -1, *([1] * (labels.ndim - 2)))).float()
    count = onehot.flatten(2).sum(2)
    mean_p = (pred * onehot).flatten(2).sum(2) / count.clamp_min(1)
    mean_t = (target * onehot).flatten(2).sum(2) / count.clamp_min(1)
    present = (count >= MIN_ROI_VOXELS).float()
    return ((mean_p - mean_t) ** 2 * present).sum() / present.sum().clamp_min(1)


def train_step(ctx: StepContext, batch: Batch) -> dict[str, float]:
    cfg: PhaseGANConfig = ctx.config
    m = ctx.models
    _set_learning_rates(ctx, cfg)
    x = _volume(batch, "source", ctx.device)
    src_phase = batch["source_phase"].to(ctx.device).long()
    stage = stage_at(ctx.epoch, cfg)

    if stage in ("pretrain", "grl"):
        # The detector alone, on the current (frozen here) encoder: pre-training, and the
        # detector's catch-up epochs between generator blocks.
        with ctx.autocast():
            with torch.no_grad():
                grid, _ = m["encoder"](x)
            logits = m["detector"](tokens_of(grid).float())
            loss = token_ce(logits, src_phase)
        ctx.optimize(loss, "det")
        acc = (logits.mean(1).argmax(1) == src_phase).float().mean()
        return {"loss/ce": float(loss.detach()), "detector_acc": float(acc)}

    window = HUWindow(**ctx.data.window)
    y = _volume(batch, "target", ctx.device)
    labels = batch["labels"].to(ctx.device).long().unsqueeze(1)
    tgt_phase = batch["target_phase"].to(ctx.device).long()
    lam = lambda_at(ctx.epoch, cfg)
    with ctx.autocast():
        grid, _ = m["encoder"](x)
        fake = m["generator"](x, grid, m["phase_code"](tgt_phase))
        loss_gan = gan_loss(last_logits(m["discriminator"](fake, tgt_phase)), True)
        weight = change_weights(x, y, cfg, window) if cfg.rec_change_weight else None
        loss_rec = reconstruction_loss(fake.float(), y, cfg, window, weight)
        scale = (window.hi - window.lo) / REC_SCALE_HU
        loss_idt = F.l1_loss(fake.float(), x) * scale
        loss_organ = organ_mean_loss(fake.float(), y, labels) * scale**2
        # DANN: the detector learns the source phase from every token; the encoder gets the
        # reversed gradient, λ-weighted against the image losses in the same update.
        logits = m["detector"](tokens_of(grad_reverse(grid, lam)).float())
        loss_ce = token_ce(logits, src_phase)
        loss_g = (
            cfg.lambda_rec * loss_rec
            + cfg.lambda_identity * loss_idt
            + cfg.lambda_gan * loss_gan
            + cfg.lambda_ce * loss_ce
            + cfg.lambda_organ * loss_organ
        )
    ctx.optimize(loss_g, "g", "det")
    loss_d = discriminator_step(
        m["discriminator"],
        y,
        fake,
        lambda loss: ctx.optimize(loss, "d"),
        autocast=ctx.autocast,
        label=tgt_phase,
    )
    acc = (logits.mean(1).argmax(1) == src_phase).float().mean()
    return {
        "loss/g": float(loss_g.detach()),
        "loss/rec": float(loss_rec.detach()),
        "loss/gan": float(loss_gan.detach()),
        "loss/identity": float(loss_idt.detach()),
        "loss/organ": float(loss_organ.detach()),
        "loss/ce": float(loss_ce.detach()),
        "loss/d": loss_d,
        "detector_acc": float(acc),
        "grl_lambda": lam,
    }


def eval_step(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """Model and identity-baseline metrics against the aligned truth, overall and per target
    phase (``<phase>/<metric>``, NaN for samples of other phases), plus detector accuracy."""
    m = ctx.models
    window = HUWindow(**ctx.data.window)
    x = _volume(batch, "source", ctx.device)
    truth = _volume(batch, "truth", ctx.device)
    labels = batch["labels"].to(ctx.device).unsqueeze(1)
    tgt_phase = batch["target_phase"].to(ctx.device).long()
    src_phase = batch["source_phase"].to(ctx.device).long()
    with ctx.autocast():
        grid, _ = m["encoder"](x)
        pred = m["generator"](x, grid, m["phase_code"](tgt_phase)).float().clamp(0, 1)
        detected = detect(m, grid).argmax(1)
    metrics = image_metrics(pred, truth, labels, window)
    metrics.update(image_metrics(x, truth, labels, window, prefix="identity_"))
    metrics.update(split_by_group(metrics, tgt_phase, PHASES))
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
