"""Learning-rate schedules that live inside a family's train step (the loop has no hook).

Setting the optimisers' ``lr`` from the epoch at every step keeps the schedule stateless: a
resumed run lands on the right rate with no scheduler state to checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["constant_then_linear", "cosine_factor", "set_lr"]


def constant_then_linear(epoch: int, num_epochs: int, decay_epochs: int) -> float:
    """pix2pix's ``linear`` policy: factor 1 for the first epochs, then linear towards 0.

    With ``n = num_epochs - decay_epochs`` constant epochs, epoch ``e`` (0-based) gets
    ``1 - max(0, e + 1 - n) / (decay_epochs + 1)`` (Isola et al.'s code with epoch_count=1), so
    the last epoch still trains at ``1 / (decay_epochs + 1)`` of the base rate.
    """
    if not 0 <= decay_epochs <= num_epochs:
        raise ValueError(f"decay_epochs must be in [0, {num_epochs}], got {decay_epochs}")
    constant = num_epochs - decay_epochs
    return 1.0 - max(0, epoch + 1 - constant) / (decay_epochs + 1)


def cosine_factor(epoch: int, num_epochs: int, floor: float) -> float:
    """Cosine decay per epoch: 1 at epoch 0, ``floor`` at the last epoch (1 for a 1-epoch run)."""
    if num_epochs <= 1:
        return 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(epoch, num_epochs - 1) / (num_epochs - 1)))
    return floor + (1.0 - floor) * cosine


def set_lr(optimizers: Iterable[torch.optim.Optimizer], lr: float) -> None:
    """Set every param group of every optimiser to ``lr``."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
