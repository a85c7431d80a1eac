"""Checkpoints: what makes a resumed run continue exactly, and how it survives damage.

Every rank's RNG state is saved (rank 0 writes the checkpoint with all of them), and each rank
restores its own on resume: Python's ``random``, NumPy's global generator, torch's CPU
generator and, where there is one, the CUDA generator of the current device. Everything is
stored as tensors and plain types so ``torch.load(weights_only=True)`` reads it.

A checkpoint directory holds ``state.pt`` (written under a temporary name and renamed, so it is
whole or absent), ``state.sha256`` (its digest: a truncated copy or a flipped bit is caught,
which ``torch.load`` alone misses for the latter) and ``train_config.json``. The directory is a
local temporary one that Ray Train copies to storage. A damaged checkpoint raises
:class:`CheckpointError`; :func:`load_resumable` then falls back to the next older one and
says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

if TYPE_CHECKING:
    from ray.train import Checkpoint

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
DIGEST_FILE = "state.sha256"
CONFIG_FILE = "train_config.json"
# What the loop needs from a checkpoint to resume; a state without them is not one of ours.
REQUIRED_KEYS = ("epoch", "step", "models", "optimizers", "rng")


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


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be resumed from: missing, truncated or corrupted."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_whole(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(fh)`` into a temporary name beside ``path``, then rename: whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_checkpoint(directory: str | Path, state: dict[str, Any], config: dict[str, Any]) -> None:
    """Write a checkpoint directory: state, its digest, the train config.

    A failed write (e.g. ENOSPC) raises and leaves no ``state.pt`` behind, so nothing half
    written is ever handed to Ray Train; earlier checkpoints are separate directories and
    stay as they were.
    """
    directory = Path(directory)
    _write_whole(directory / STATE_FILE, lambda fh: torch.save(state, fh))
    digest = _sha256(directory / STATE_FILE)
    _write_whole(directory / DIGEST_FILE, lambda fh: fh.write(digest.encode()))
    text = json.dumps(config, indent=2)
    _write_whole(directory / CONFIG_FILE, lambda fh: fh.write(text.encode()))


def read_state(directory: str | Path) -> dict[str, Any]:
    """The verified ``state.pt`` of a checkpoint directory, read without unpickling code
    (one written before digests existed is read unverified).

    Raises:
        CheckpointError: the file is missing, does not match its digest, cannot be read, or
            lacks what the loop needs.
    """
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    digest_path = path.with_name(DIGEST_FILE)
    if digest_path.is_file():
        expected = digest_path.read_text().strip()
        if _sha256(path) != expected:
            raise CheckpointError(
                f"{path}: damaged ({path.stat().st_size} bytes; its SHA-256 does not match "
                f"{DIGEST_FILE})"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError ...
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a ctray checkpoint (lacks {', '.join(missing)})")
    return state


def read_config(directory: str | Path) -> dict[str, Any]:
    """The train config a checkpoint was written with."""
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from err


def load_resumable(candidates: Iterable[Checkpoint]) -> tuple[dict[str, Any], Checkpoint]:
    """The first readable checkpoint among ``candidates`` (newest first), and its state.

    Each damaged one is logged with why, and the one resumed from is named, so a fallback is
    never silent. ``candidates`` may be lazy: older ones are only listed when needed.

    Raises:
        CheckpointError: none of them is readable.
    """
    damaged: list[str] = []
    for candidate in candidates:
        try:
            with candidate.as_directory() as directory:
                state = read_state(directory)
        except CheckpointError as err:
            log.warning("checkpoint %s is damaged: %s", candidate.path, err)
            damaged.append(str(err))
            continue
        if damaged:
            log.warning(
                "resuming from the older checkpoint %s (epoch %d) instead",
                candidate.path,
                int(state["epoch"]),
            )
        return state, candidate
    raise CheckpointError("no readable checkpoint to resume from: " + "; ".join(damaged))
