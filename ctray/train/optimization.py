"""Back-propagation, gradient accumulation and clipping, owned by the loop for every family.

A family's step calls ``ctx.optimize(loss, "g")`` instead of ``loss.backward(); opt.step()``.
With ``accumulate=k`` the loss is scaled by 1/k and the optimiser steps on every k-th call
(per optimiser, so a GAN's G and D accumulate independently); gradients are clipped to
``grad_clip`` (global L2 norm over that optimiser's parameters) just before each step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ctray.registry import Optimizers


class Optimization:
    """The ``optimize`` callable of a step context, with the stage's global step count.

    Args:
        optimizers: the stage's named optimisers.
        accumulate: micro-batches per optimiser step (>= 1).
        grad_clip: max global gradient norm per optimiser (None: no clipping).
        step: global step to start from (a resumed run continues its count).
    """

    def __init__(
        self,
        optimizers: Optimizers,
        *,
        accumulate: int = 1,
        grad_clip: float | None = None,
        step: int = 0,
    ):
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        self.optimizers = optimizers
        self.accumulate = accumulate
        self.grad_clip = grad_clip
        self.step = step
        self._calls = dict.fromkeys(optimizers, 0)
        self._batches = 0
        self.last_grad_norm: dict[str, float] = {}

    def __call__(self, loss: torch.Tensor, *names: str) -> bool:
        """Back-propagate ``loss``; step the named optimisers on an accumulation boundary.

        Returns True when the optimisers stepped. Gradients are zeroed when a window starts,
        so gradients another loss left on these parameters never leak into the step.
        """
        unknown = [n for n in names if n not in self.optimizers]
        if not names or unknown:
            raise KeyError(
                f"optimize() needs optimiser names from: {', '.join(self.optimizers)}; "
                f"got {', '.join(names) or 'none'}"
            )
        for name in names:
            if self._calls[name] % self.accumulate == 0:
                # A new accumulation window: drop gradients other losses left on these
                # parameters (e.g. G's adversarial loss back-propagated through D).
                self.optimizers[name].zero_grad(set_to_none=True)
        (loss / self.accumulate).backward()
        boundary = True
        for name in names:
            self._calls[name] += 1
            boundary &= self._calls[name] % self.accumulate == 0
        if not boundary:
            return False
        for name in names:
            opt = self.optimizers[name]
            if self.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(list(_params(opt)), self.grad_clip)
                self.last_grad_norm[name] = float(norm)
            opt.step()
        return True

    def end_batch(self) -> None:
        """Count one global step per ``accumulate`` micro-batches."""
        self._batches += 1
        if self._batches % self.accumulate == 0:
            self.step += 1


def _params(opt: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for group in opt.param_groups:
        yield from (p for p in group["params"] if p.grad is not None)
