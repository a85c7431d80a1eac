"""Build, train, evaluate and predict for slice_ldm's two stages; the generic loop calls these.

Stage ``autoencoder``: AutoencoderKL on thin patches, L1 + kl_weight * KL (+ adv_weight * LSGAN
from a 3D PatchDiscriminator after its warm-up; the perceptual term of the LDM recipe is left
out: no network for it can be loaded here). Metrics: reconstruction PSNR / SSIM / MAE.

Stage ``diffusion``: the frozen autoencoder encodes the thin patch and the cubic-upsampled
thick patch (posterior means, no sampling); a DiffusionModelUNet learns the thin latent (or its
residual over the cubic latent) from noise, conditioned on the cubic latent by concatenation.
DDPM noise for training, DDIM (eta 0) for sampling, ``clip_sample=False`` (latents are not in
[-1, 1]). Metrics on the data's HU window and on the soft-tissue window (PSNR and SSIM after
re-windowing), MAE in HU inside the body, each beside the linear and cubic baselines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from ctray.data.nifti import HUWindow
from ctray.data.thick_slices import cubic_z, linear_z
from ctray.metrics import mae_hu, psnr, ssim
from ctray.nn.gan import adversarial_step
from ctray.optim import set_lr
from ctray.registry import Batch, DataInfo, Models, Optimizers, StepContext

from .config import SliceLDMConfig
from .model import (
    LatentDenoiser,
    build_autoencoder,
    build_discriminator,
    check_geometry,
    encode_mean,
    kl_loss,
)

GAN_MODE = "lsgan"


def build_models(cfg: SliceLDMConfig, data: DataInfo) -> Models:
    """Every module of both stages (pure construction; shapes validated against the data)."""
    check_geometry(cfg, data.patch_size, data.output_scale)
    return {
        "autoencoder": build_autoencoder(cfg),
        "discriminator": build_discriminator(cfg),
        "denoiser": LatentDenoiser(cfg, factor=data.output_scale[2]),
    }


def build_ae_optimizers(cfg: SliceLDMConfig, models: Models) -> Optimizers:
    return {
        "ae": torch.optim.Adam(models["autoencoder"].parameters(), lr=cfg.lr_ae),
        "d": torch.optim.Adam(models["discriminator"].parameters(), lr=cfg.lr_d, betas=(0.5, 0.9)),
    }


def build_diffusion_optimizers(cfg: SliceLDMConfig, models: Models) -> Optimizers:
    return {"denoiser": torch.optim.AdamW(models["denoiser"].parameters(), lr=cfg.lr_diffusion)}


def _volume(batch: Batch, key: str, device: torch.device) -> torch.Tensor:
    return batch[key].to(device=device, dtype=torch.float32).unsqueeze(1)


def _bare(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


# --------------------------------------------------------------------------- stage 1


def adversarial_active(cfg: SliceLDMConfig, epoch: int, step: int) -> bool:
    return cfg.adv_weight > 0 and epoch >= cfg.adv_warmup_epochs and step >= cfg.adv_warmup_steps


def ae_train_step(ctx: StepContext, batch: Batch) -> dict[str, float]:
    cfg: SliceLDMConfig = ctx.config
    ae, disc = ctx.models["autoencoder"], ctx.models["discriminator"]
    factor = cfg.lr_factor(ctx.epoch, ctx.num_epochs)
    set_lr([ctx.optimizers["ae"]], cfg.lr_ae * factor)
    set_lr([ctx.optimizers["d"]], cfg.lr_d * factor)
    thin = _volume(batch, "thin", ctx.device)
    with ctx.autocast():
        recon, mu, sigma = ae(thin)
    recon = recon.float()
    loss_l1 = F.l1_loss(recon, thin)
    loss_kl = kl_loss(mu, sigma)
    loss = loss_l1 + cfg.kl_weight * loss_kl
    out = {"loss/l1": float(loss_l1.detach()), "loss/kl": float(loss_kl.detach())}
    if adversarial_active(cfg, ctx.epoch, ctx.step):
        loss_adv, out["loss/d"] = adversarial_step(
            disc,
            thin,
            recon,
            lambda d_loss: ctx.optimize(d_loss, "d"),
            mode=GAN_MODE,
            autocast=ctx.autocast,
        )
        loss = loss + cfg.adv_weight * loss_adv
        out["loss/adv"] = float(loss_adv.detach())
    ctx.optimize(loss, "ae")
    out["loss/ae"] = float(loss.detach())
    out["lr"] = cfg.lr_ae * factor
    return out


def reconstruct(ae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction (decode the posterior mean), clamped to [0, 1]."""
    return _bare(ae).decode(encode_mean(_bare(ae), x)).float().clamp(0, 1)


def ae_eval_step(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    window = HUWindow(**ctx.data.window)
    thin = _volume(batch, "thin", ctx.device)
    body = batch["body"].to(ctx.device).unsqueeze(1) > 0
    with ctx.autocast():
        recon = reconstruct(ctx.models["autoencoder"], thin)
    return {
        "recon_psnr": psnr(recon, thin),
        "recon_ssim": ssim(recon, thin),
        "recon_mae_hu": mae_hu(recon, thin, body, window),
    }


def ae_preview(models: Models, batch: Batch, cfg: SliceLDMConfig) -> tuple[torch.Tensor, ...]:
    ae = models["autoencoder"]
    thin = _volume(batch, "thin", next(ae.parameters()).device)[:1]
    recon = reconstruct(ae, thin)
    return thin[0, 0], recon[0, 0], thin[0, 0]


# --------------------------------------------------------------------------- stage 2


def ddpm(cfg: SliceLDMConfig) -> DDPMScheduler:
    """The training noise schedule (a fresh object: MONAI schedulers cache device tensors)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        schedule=cfg.schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        **_betas(cfg),
    )


def ddim(cfg: SliceLDMConfig, steps: int, device: torch.device) -> DDIMScheduler:
    """The sampler, with ``steps`` DDIM steps over the training schedule."""
    sched = DDIMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        schedule=cfg.schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        **_betas(cfg),
    )
    sched.set_timesteps(steps, device=device)
    return sched


def _betas(cfg: SliceLDMConfig) -> dict[str, float]:
    if cfg.schedule == "cosine":
        return {}
    return {"beta_start": cfg.beta_start, "beta_end": cfg.beta_end}


def latents(
    ae: torch.nn.Module, thick: torch.Tensor, factor: int, thin: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(cubic-upsampled thick, its latent, the thin latent or None); no gradients."""
    with torch.no_grad():
        cubic = cubic_z(thick, factor)
        z_cubic = encode_mean(_bare(ae), cubic).float()
        z_thin = None if thin is None else encode_mean(_bare(ae), thin).float()
    return cubic, z_cubic, z_thin


def diffusion_train_step(ctx: StepContext, batch: Batch) -> dict[str, float]:
    cfg: SliceLDMConfig = ctx.config
    den = ctx.models["denoiser"]
    bare: LatentDenoiser = _bare(den)
    lr = cfg.lr_diffusion * cfg.lr_factor(ctx.epoch, ctx.num_epochs)
    set_lr(ctx.optimizers.values(), lr)
    thick, thin = _volume(batch, "thick", ctx.device), _volume(batch, "thin", ctx.device)
    with ctx.autocast():
        _, z_cubic, z_thin = latents(ctx.models["autoencoder"], thick, bare.factor, thin)
    target = z_thin - z_cubic if cfg.residual else z_thin
    bare.measure_scales(z_cubic, target)
    cond, x0 = z_cubic * bare.cond_scale, target * bare.target_scale
    sched = ddpm(cfg)
    noise = torch.randn_like(x0)
    t = torch.randint(0, cfg.train_timesteps, (x0.shape[0],), device=ctx.device)
    noisy = sched.add_noise(x0, noise, t)
    with ctx.autocast():
        pred = den(noisy, t, cond).float()
    if cfg.prediction_type == "epsilon":
        goal = noise
    elif cfg.prediction_type == "v_prediction":
        goal = sched.get_velocity(x0, noise, t)
    else:
        goal = x0
    loss = F.mse_loss(pred, goal)
    ctx.optimize(loss, "denoiser")
    return {
        "loss/mse": float(loss.detach()),
        "latent/target_scale": float(bare.target_scale),
        "lr": lr,
    }


@torch.no_grad()
def sample(
    models: Models, thick: torch.Tensor, cfg: SliceLDMConfig, steps: int
) -> dict[str, torch.Tensor]:
    """Thin predictions for thick patches (B, 1, X, Y, Z), each (B, 1, X, Y, Z * f) in [0, 1].

    Returns both readings of the sampled latent z, ``decode`` = D(z) and ``cubic_delta`` =
    cubic + D(z) - D(z_cubic), and the ``cubic`` baseline they start from.
    """
    ae, den = _bare(models["autoencoder"]), _bare(models["denoiser"])
    den.check_scaled()
    cubic, z_cubic, _ = latents(ae, thick, den.factor)
    cond = z_cubic * den.cond_scale
    sched = ddim(cfg, steps, thick.device)
    generator = torch.Generator(device=thick.device).manual_seed(cfg.seed)
    x = torch.randn(z_cubic.shape, generator=generator, device=thick.device)
    for t in sched.timesteps:
        timesteps = torch.full((x.shape[0],), int(t), device=thick.device, dtype=torch.long)
        out = den(x, timesteps, cond).float()
        x, _ = sched.step(out, int(t), x)
    z = x / den.target_scale
    if cfg.residual:
        z = z + z_cubic
    decoded = ae.decode(z).float()
    delta = cubic + decoded - ae.decode(z_cubic).float()
    return {
        "decode": decoded.clamp(0, 1),
        "cubic_delta": delta.clamp(0, 1),
        "cubic": cubic.clamp(0, 1),
    }


def _windowed(x: torch.Tensor, data: HUWindow, soft: HUWindow) -> torch.Tensor:
    return soft.normalise(data.denormalise(x))


def image_metrics(
    pred: torch.Tensor,
    thin: torch.Tensor,
    body: torch.Tensor,
    window: HUWindow,
    soft: HUWindow,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """PSNR / SSIM on the data window and the soft window, MAE in HU inside the body."""
    pred_soft, thin_soft = _windowed(pred, window, soft), _windowed(thin, window, soft)
    return {
        f"{prefix}psnr": psnr(pred, thin),
        f"{prefix}ssim": ssim(pred, thin),
        f"{prefix}psnr_soft": psnr(pred_soft, thin_soft),
        f"{prefix}ssim_soft": ssim(pred_soft, thin_soft),
        f"{prefix}mae_hu": mae_hu(pred, thin, body, window),
    }


def diffusion_eval_step(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    cfg: SliceLDMConfig = ctx.config
    window, soft = (
        HUWindow(**ctx.data.window),
        HUWindow(lo=cfg.soft_window[0], hi=cfg.soft_window[1]),
    )
    thick, thin = _volume(batch, "thick", ctx.device), _volume(batch, "thin", ctx.device)
    body = batch["body"].to(ctx.device).unsqueeze(1) > 0
    factor = _bare(ctx.models["denoiser"]).factor
    with ctx.autocast():
        out = sample(ctx.models, thick, cfg, cfg.val_sample_steps)
    pred, cubic = out[cfg.output], out["cubic"]
    linear = linear_z(thick, factor).clamp(0, 1)
    metrics = image_metrics(pred, thin, body, window, soft)
    other = "decode" if cfg.output == "cubic_delta" else "cubic_delta"
    metrics[f"psnr_{other}"] = psnr(out[other], thin)  # the other reading, for comparison
    metrics.update(image_metrics(linear, thin, body, window, soft, prefix="linear_"))
    metrics.update(image_metrics(cubic, thin, body, window, soft, prefix="cubic_"))
    return metrics


def diffusion_preview(
    models: Models, batch: Batch, cfg: SliceLDMConfig
) -> tuple[torch.Tensor, ...]:
    """(cubic-upsampled thick, prediction, thin truth) of the first sample."""
    device = next(models["autoencoder"].parameters()).device
    thick = _volume(batch, "thick", device)[:1]
    out = sample(models, thick, cfg, cfg.val_sample_steps)
    return out["cubic"][0, 0], out[cfg.output][0, 0], _volume(batch, "thin", device)[0, 0]


def predict(
    models: Models, x: torch.Tensor, cfg: SliceLDMConfig, cond: Mapping[str, Any]
) -> torch.Tensor:
    """Thick patches (B, 1, X, Y, Z) in [0, 1] -> thin patches (B, 1, X, Y, Z * factor)."""
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"slice_ldm predicts (B, 1, X, Y, Z) thick patches, got {tuple(x.shape)}")
    check_geometry(cfg, tuple(x.shape[2:]), (1, 1, _bare(models["denoiser"]).factor))
    return sample(models, x.float(), cfg, cfg.sample_steps)[cfg.output]
