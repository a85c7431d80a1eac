"""GAN losses and the discriminator update, shared by image-to-image families.

The discriminator outputs logits (no Sigmoid); ``vanilla`` is BCE-with-logits, ``lsgan`` is the
least-squares loss on the same logits. The discriminator step trains on a detached fake so its
backward can never reach the generator. :class:`ProjectionPatchDiscriminator` conditions a
PatchGAN on a class (e.g. the target contrast phase), so it can reject a realistic image of the
wrong class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GANMode",
    "ProjectionPatchDiscriminator",
    "adversarial_step",
    "discriminator_step",
    "gan_loss",
    "last_logits",
]

GANMode = Literal["vanilla", "lsgan"]


def last_logits(out: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """MONAI's PatchDiscriminator returns every layer's features; the last are the logits."""
    return out[-1] if isinstance(out, list | tuple) else out


class ProjectionPatchDiscriminator(nn.Module):
    """PatchGAN with a projection on a class label (Miyato & Koyama, ICLR 2018).

    Per patch, ``logit = w . phi(x) + embed(y) . phi(x)``: MONAI's PatchDiscriminator gives
    ``phi`` (its last hidden features) and, with a 1x1 final convolution, the unconditional
    term; the class embedding adds the inner product. An unconditional discriminator accepts
    any realistic phase; this one penalises a realistic image of the wrong phase.

    Args:
        spatial_dims / channels / in_channels / num_layers_d / norm: as PatchDiscriminator.
        num_classes: number of class labels.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        channels: int,
        in_channels: int,
        num_layers_d: int,
        num_classes: int,
        norm: str = "INSTANCE",
    ):
        super().__init__()
        from monai.networks.nets import PatchDiscriminator

        self.net = PatchDiscriminator(
            spatial_dims=spatial_dims,
            channels=channels,
            in_channels=in_channels,
            num_layers_d=num_layers_d,
            norm=norm,
            last_conv_kernel_size=1,
        )
        self.embed = nn.Embedding(num_classes, channels * 2**num_layers_d)
        nn.init.zeros_(self.embed.weight)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's features, the last being the (B, 1, *patches) logits."""
        out = self.net(x)
        feats = out[-2]
        e = self.embed(label.long()).reshape(*label.shape, -1, *([1] * (feats.ndim - 2)))
        proj = (e * feats).sum(dim=1, keepdim=True)
        return [*out[:-1], out[-1] + proj]


def gan_loss(logits: torch.Tensor, real: bool, mode: GANMode = "vanilla") -> torch.Tensor:
    """Adversarial loss of ``logits`` against an all-real or all-fake target."""
    logits = logits.float()
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(logits, target)
    if mode == "lsgan":
        return F.mse_loss(logits, target)
    raise ValueError(f"unknown gan_mode {mode!r}; valid: vanilla, lsgan")


def discriminator_step(
    disc: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    optimize: Callable[[torch.Tensor], Any],
    *,
    mode: GANMode = "vanilla",
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    label: torch.Tensor | None = None,
) -> float:
    """One D update; returns its loss. ``fake`` is detached here: no gradient reaches G.

    ``label`` (B,): the class both ``real`` and ``fake`` are meant to be, for a conditional
    discriminator called as ``disc(x, label)``.

    ``optimize(loss)`` back-propagates and steps D's optimiser (in the loop:
    ``lambda loss: ctx.optimize(loss, "d")``, which adds accumulation and clipping).
    Real and fake go through one forward pass, which DDP requires when a module is used once per
    backward (with batch norm they also share the batch statistics).
    """
    with autocast() if autocast is not None else nullcontext():
        both = torch.cat((real, fake.detach()), dim=0)
        if label is None:
            logits = last_logits(disc(both))
        else:
            logits = last_logits(disc(both, torch.cat((label, label), dim=0)))
        real_logits, fake_logits = logits.chunk(2, dim=0)
        loss = 0.5 * (gan_loss(real_logits, True, mode) + gan_loss(fake_logits, False, mode))
    optimize(loss)
    return float(loss.detach())


def adversarial_step(
    disc: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    optimize: Callable[[torch.Tensor], Any],
    *,
    mode: GANMode = "vanilla",
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> tuple[torch.Tensor, float]:
    """An unconditional GAN term for an autoencoder: one D update, then G's adversarial loss.

    Returns ``(loss_adv, loss_d)``: ``loss_adv`` (with its graph, for the caller to weigh into
    the generator's loss) is judged by the just-updated discriminator.
    """
    loss_d = discriminator_step(disc, real, fake, optimize, mode=mode, autocast=autocast)
    with autocast() if autocast is not None else nullcontext():
        loss_adv = gan_loss(last_logits(disc(fake)), True, mode)
    return loss_adv, loss_d
