"""Checkpoint contents that make a resumed run continue exactly: RNG streams and EMA copies.

Every rank's RNG state is saved (rank 0 writes the checkpoint with all of them), and each rank
restores its own on resume: Python's ``random``, NumPy's global generator, torch's CPU
generator and, where there is one, the CUDA generator of the current device. Everything is
stored as tensors and plain types so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG streams, in a form weights_only loading accepts."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(
        (
            nps["kind"],
            nps["keys"].numpy().astype(np.uint32),
            nps["pos"],
            nps["has_gauss"],
            nps["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a list of one without a process group)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def restore_rank_rng(states: list[dict[str, Any]], rank: int, *, fallback_seed: int) -> bool:
    """Restore this rank's saved RNG; a rank the checkpoint has no state for is reseeded.

    Returns True when the exact saved state was restored.
    """
    if rank < len(states):
        set_rng_state(states[rank])
        return True
    seed_everything(fallback_seed)
    return False


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of update ``updates`` (0-based count of earlier updates): warmed up as
    min(decay, (1 + n) / (10 + n)), so a short run's EMA is not stuck near its first steps
    (with 0.999 and no warm-up, 100 steps leave 90 % of the weight on the initial copy)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def make_ema(module: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``module`` with a warmed-up decay (floating-point buffers averaged too,
    so norm statistics follow); the first update copies the module. Integer buffers (counters,
    index tables) are copied, not averaged: an average cast back to an integer truncates
    (0.995 * 200 + 0.005 * 200 came back as 199)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {decay}")

    def average(averaged: torch.Tensor, current: torch.Tensor, count: torch.Tensor):
        if not averaged.is_floating_point():
            return current
        d = ema_decay_at(decay, int(count))
        return averaged * d + current * (1.0 - d)

    return AveragedModel(module, avg_fn=average, use_buffers=True)


def ema_weights(ema: AveragedModel) -> dict[str, torch.Tensor]:
    """The averaged module's own state dict (no ``module.`` prefix, no counter)."""
    return ema.module.state_dict()
