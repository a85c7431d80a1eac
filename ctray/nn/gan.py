"""GAN losses and the discriminator update, shared by image-to-image families.

The discriminator outputs logits (no Sigmoid); ``vanilla`` is BCE-with-logits, ``lsgan`` is the
least-squares loss on the same logits. The discriminator step trains on a detached fake so its
backward can never reach the generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GANMode", "discriminator_step", "gan_loss", "last_logits"]

GANMode = Literal["vanilla", "lsgan"]


def last_logits(out: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """MONAI's PatchDiscriminator returns every layer's features; the last are the logits."""
    return out[-1] if isinstance(out, list | tuple) else out


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
) -> float:
    """One D update; returns its loss. ``fake`` is detached here: no gradient reaches G.

    ``optimize(loss)`` back-propagates and steps D's optimiser (in the loop:
    ``lambda loss: ctx.optimize(loss, "d")``, which adds accumulation and clipping).
    Real and fake go through one forward pass, which DDP requires when a module is used once per
    backward (with batch norm they also share the batch statistics).
    """
    with autocast() if autocast is not None else nullcontext():
        logits = last_logits(disc(torch.cat((real, fake.detach()), dim=0)))
        real_logits, fake_logits = logits.chunk(2, dim=0)
        loss = 0.5 * (gan_loss(real_logits, True, mode) + gan_loss(fake_logits, False, mode))
    optimize(loss)
    return float(loss.detach())
