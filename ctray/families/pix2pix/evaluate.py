"""Per-volume metrics of an exported pix2pix model on held-out NIfTI pairs.

The loop's validation metrics are per slice in the resized training geometry; these run the
real inference path (``ctray.inference``: input grid in, input grid out) on whole volumes and
compare with B on A's grid, in HU, inside A's body (HU > -500).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ctray.data.nifti import HUWindow, Volume
from ctray.inference import predict_volumes
from ctray.metrics import image_metrics
from ctray.modeldir import LoadedModel

from .data import BODY_HU, PairPaths, find_pairs, load_pair

__all__ = ["evaluate_pair", "evaluate_pairs", "mean_metrics", "volume_metrics"]


def volume_metrics(
    pred_hu: np.ndarray, truth_hu: np.ndarray, body: np.ndarray, window: HUWindow
) -> dict[str, float]:
    """MAE (HU, inside ``body``), PSNR and SSIM (in ``window``) of one whole volume."""

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32))[None, None]

    out = image_metrics(
        window.normalise(t(pred_hu)), window.normalise(t(truth_hu)), t(body), window, organs=()
    )
    return {k: float(v[0]) for k, v in out.items()}


def evaluate_pair(
    model: LoadedModel, a: Volume, b: np.ndarray, *, sw_batch_size: int = 8
) -> dict[str, float]:
    """Model and identity-baseline (``identity_*``) metrics of A -> B, B on A's grid."""
    window = HUWindow(**model.data.window)
    pred = predict_volumes(model, [a], [{}], sw_batch_size=sw_batch_size)[0].array
    body = a.array > BODY_HU
    metrics = volume_metrics(pred, b, body, window)
    identity = volume_metrics(a.array, b, body, window)
    return {**metrics, **{f"identity_{k}": v for k, v in identity.items()}}


def evaluate_pairs(
    model: LoadedModel,
    pairs: str | Path | Sequence[PairPaths],
    *,
    split: str | None = "val",
    sw_batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Metrics per subject for NIfTI pairs (a trainA/trainB[/testA/testB] folder, a CSV, or a list).

    With a folder or CSV, only pairs of ``split`` are used when any pair has a split (testA/testB
    are ``val``); otherwise all of them. Unusable pairs raise NiftiError.
    """
    if isinstance(pairs, str | Path):
        found = find_pairs(Path(pairs), [])
        if split is not None and any(p.split for p in found):
            found = [p for p in found if p.split == split]
        pairs = found
    out = {}
    for pair in pairs:
        a, b, _ = load_pair(pair)
        out[pair.subject] = evaluate_pair(model, a, b, sw_batch_size=sw_batch_size)
    return out


def mean_metrics(per_subject: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The mean of each metric over subjects (NaN-aware)."""
    keys = sorted({k for m in per_subject.values() for k in m})
    means = {}
    for k in keys:
        vals = [m[k] for m in per_subject.values() if k in m and math.isfinite(m[k])]
        means[k] = float(np.mean(vals)) if vals else math.nan
    return means
