"""Networks of slice_ldm: MONAI's AutoencoderKL, PatchDiscriminator and a latent denoiser.

The denoiser wraps MONAI's DiffusionModelUNet: its input is the noisy latent concatenated
with the condition latent (so ``in_channels`` is twice the latent's), and it carries the latent
scale factors as buffers, so they are checkpointed, averaged into the EMA copy unchanged and
exported with the weights. A scale of 0 means "not measured yet": the first diffusion training
batch sets it once (1 / std of the latents it sees).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from torch import nn

from .config import SliceLDMConfig


def build_autoencoder(cfg: SliceLDMConfig) -> AutoencoderKL:
    levels = len(cfg.ae_channels)
    return AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=tuple(cfg.ae_channels),
        num_res_blocks=cfg.ae_res_blocks,
        attention_levels=(False,) * (levels - 1) + (cfg.ae_attention,),
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        with_encoder_nonlocal_attn=cfg.ae_attention,
        with_decoder_nonlocal_attn=cfg.ae_attention,
    )


def build_discriminator(cfg: SliceLDMConfig) -> PatchDiscriminator:
    return PatchDiscriminator(
        spatial_dims=3,
        num_layers_d=cfg.disc_layers,
        channels=cfg.disc_channels,
        in_channels=1,
        out_channels=1,
        norm="INSTANCE",
    )


def encode_mean(ae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """The posterior mean of ``x``'s latent (``encode_stage_2_inputs`` would sample)."""
    return ae.encode(x)[0]


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over the latent, averaged over the batch."""
    mu, sigma = mu.float(), sigma.float()
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(1).mean()


class LatentDenoiser(nn.Module):
    """DiffusionModelUNet over (noisy latent, condition latent), with the latent scales.

    Args:
        cfg: the family config (widths, attention).
        factor: thin slices per thick slice of the data it serves (not a weight: rebuilt
            from the data geometry, so an export always agrees with its model.json).
    """

    def __init__(self, cfg: SliceLDMConfig, *, factor: int) -> None:
        super().__init__()
        levels = len(cfg.unet_channels)
        self.factor = int(factor)
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=2 * cfg.latent_channels,
            out_channels=cfg.latent_channels,
            channels=tuple(cfg.unet_channels),
            num_res_blocks=cfg.unet_res_blocks,
            attention_levels=(False,) * (levels - 1) + (cfg.unet_attention,),
            norm_num_groups=cfg.norm_groups,
            num_head_channels=cfg.num_head_channels,
        )
        # 1/std of the condition latent and of the diffusion target (0 = not measured yet).
        self.register_buffer("cond_scale", torch.zeros(()))
        self.register_buffer("target_scale", torch.zeros(()))

    @property
    def scaled(self) -> bool:
        return bool(self.cond_scale > 0) and bool(self.target_scale > 0)

    @torch.no_grad()
    def measure_scales(self, cond: torch.Tensor, target: torch.Tensor) -> None:
        """Set both scales once from a batch (averaged over workers when distributed)."""
        if self.scaled:
            return
        stds = torch.stack([cond.float().std(), target.float().std()]).to(self.cond_scale)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stds)
            stds /= dist.get_world_size()
        self.cond_scale.copy_(1.0 / stds[0].clamp_min(1e-6))
        self.target_scale.copy_(1.0 / stds[1].clamp_min(1e-6))

    def check_scaled(self) -> None:
        if not self.scaled:
            raise RuntimeError(
                "the denoiser's latent scales were never measured: it has not been trained "
                "(train the diffusion stage, or load an exported diffusion-stage model)"
            )

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(torch.cat((noisy, cond), dim=1), timesteps)


def check_geometry(
    cfg: SliceLDMConfig, thick_patch: Sequence[int], output_scale: Sequence[int]
) -> tuple[int, ...]:
    """Validate that the networks fit the patch; returns the latent size.

    Raises:
        ValueError: naming what to change (patch, factor or widths).
    """
    if len(thick_patch) != 3:
        raise ValueError(f"slice_ldm needs 3D thick patches (X, Y, Z), got {tuple(thick_patch)}")
    scale = tuple(int(s) for s in output_scale)
    if scale[:2] != (1, 1) or scale[2] < 2:
        raise ValueError(
            f"slice_ldm needs shards with output_scale (1, 1, factor >= 2), got {scale}; "
            "build them with `ctray data build --family slice_ldm --option factor=5`"
        )
    thin = (thick_patch[0], thick_patch[1], thick_patch[2] * scale[2])
    down = cfg.ae_downsample
    if any(s % down for s in thin):
        raise ValueError(
            f"the thin patch {thin} (thick {tuple(thick_patch)} x{scale[2]} in z) is not "
            f"divisible by {down} on every axis, as AutoencoderKL with {len(cfg.ae_channels)} "
            f"levels needs (it would silently truncate); pick X and Y multiples of {down} and a "
            f"thick Z with Z * {scale[2]} a multiple of {down}, or use fewer ae_channels levels"
        )
    if cfg.adv_weight > 0:
        smallest = min(thin)
        out = smallest
        for _ in range(cfg.disc_layers):
            out //= 2
        if out - 2 < 1:
            raise ValueError(
                f"a PatchDiscriminator with {cfg.disc_layers} strided layers needs every thin "
                f"patch axis >= {3 * 2**cfg.disc_layers} voxels, the smallest is {smallest}; "
                "lower disc_layers, use a larger patch, or set adv_weight=0"
            )
    latent = tuple(s // down for s in thin)
    unet = cfg.unet_downsample
    if any(s % unet for s in latent):
        raise ValueError(
            f"the latent {latent} (thin patch {thin} / {down}) cannot be halved "
            f"{len(cfg.unet_channels) - 1} times by the denoiser; pick a patch whose thin size "
            f"is a multiple of {down * unet} on every axis, or use fewer unet_channels levels"
        )
    return latent
