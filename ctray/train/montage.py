"""Axial / coronal / sagittal montages of input, output and target for TensorBoard."""

from __future__ import annotations

import numpy as np
import torch


def _mid_slices(vol: np.ndarray) -> list[np.ndarray]:
    x, y, z = (s // 2 for s in vol.shape)
    # Transpose and flip so that anterior is up and the patient's right is on the left.
    return [np.flipud(vol[:, :, z].T), np.flipud(vol[:, y, :].T), np.flipud(vol[x, :, :].T)]


def montage(input: torch.Tensor, output: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """A (H, W) float image in [0, 1]: rows input/output/target, columns the three planes."""
    rows = []
    for vol in (input, output, target):
        planes = _mid_slices(vol.detach().float().cpu().clamp(0, 1).numpy())
        height = max(p.shape[0] for p in planes)
        padded = [np.pad(p, ((0, height - p.shape[0]), (0, 1))) for p in planes]
        rows.append(np.concatenate(padded, axis=1))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 1), (0, width - r.shape[1]))) for r in rows], axis=0)
