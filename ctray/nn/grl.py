"""Gradient reversal (Ganin & Lempitsky, 2015) and the schedules of its strength λ."""

from __future__ import annotations

import math
from typing import Literal

import torch

GRLSchedule = Literal["constant", "linear", "dann"]
GRL_SCHEDULES: tuple[str, ...] = ("constant", "linear", "dann")


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-lam`` backward."""
    return _GradientReversal.apply(x, float(lam))


def grl_lambda(kind: str, progress: float, *, maximum: float = 1.0, gamma: float = 10.0) -> float:
    """λ at training progress ``progress`` in [0, 1] (clipped).

    Args:
        kind: ``constant`` (always ``maximum``), ``linear`` (0 -> maximum) or ``dann``
            (``maximum * (2 / (1 + exp(-gamma * p)) - 1)``, Ganin et al. 2016, γ = 10 there).
        progress: fraction of the adversarial schedule completed.
        maximum: the largest λ the schedule reaches.
        gamma: steepness of the DANN sigmoid.
    """
    p = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return maximum
    if kind == "linear":
        return maximum * p
    if kind == "dann":
        return maximum * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)
    raise ValueError(f"unknown GRL schedule {kind!r}; valid: {', '.join(GRL_SCHEDULES)}")
