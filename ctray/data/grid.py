"""Output grids of models whose output is finer than their input (e.g. thin from thick slices)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def refine_grid(
    affine: np.ndarray, shape: Sequence[int], scale: Sequence[int]
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The grid with ``scale[i]`` times as many voxels along axis i over the same world extent.

    Output voxel j along an axis sits at input voxel coordinate -0.5 + (j + 0.5) / scale, so
    the ``scale`` output voxels of input voxel k are centred on k, and the outer faces of the
    first and last voxels coincide with the input's: it overlays the input in any viewer.
    """
    factors = np.asarray(scale, dtype=np.float64)
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    out = np.eye(4)
    out[:3, :3] = linear / factors  # column i scaled by 1 / scale[i]
    out[:3, 3] = linear @ (-0.5 + 0.5 / factors) + np.asarray(affine)[:3, 3]
    return out, tuple(int(n) * int(f) for n, f in zip(shape, scale, strict=True))
