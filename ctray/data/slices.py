"""In-plane resizing of axial slices, shared by 2D data builders and volume inference.

A 2D model trained on slices resized to a fixed in-plane size (pix2pix's ``resize_to``) must see
exactly the same resize at predict time, so both sides use these functions. The z axis is never
touched; the affine is updated so the resized slices cover the same field of view (voxel-centre
convention of ``align_corners=False``), which lets a prediction be resized back onto the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ctray.data.nifti import Volume

__all__ = ["inplane_affine", "resize_inplane", "resize_slices"]


def resize_slices(array: np.ndarray, size: Sequence[int], *, mode: str = "bilinear") -> np.ndarray:
    """Resize every axial slice of an (X, Y, Z) array to ``size`` = (X', Y'); z is unchanged.

    Downsizing is antialiased (bilinear), so a 512 -> 128 resize averages instead of aliasing.
    ``mode="nearest"`` is for label maps (the dtype is kept). Same-size input is returned as is.
    """
    target = (int(size[0]), int(size[1]))
    if tuple(array.shape[:2]) == target:
        return array
    t = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)[:, None]
    if mode == "nearest":
        out = F.interpolate(t, size=target, mode="nearest-exact")
    else:
        shrink = target[0] < array.shape[0] or target[1] < array.shape[1]
        out = F.interpolate(t, size=target, mode=mode, align_corners=False, antialias=shrink)
    res = out[:, 0].permute(1, 2, 0).numpy()
    if np.issubdtype(array.dtype, np.integer):
        res = np.rint(res).astype(array.dtype)
    return np.ascontiguousarray(res, dtype=res.dtype if res.dtype != np.float64 else np.float32)


def inplane_affine(affine: np.ndarray, shape: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The affine of an (X, Y, Z) grid after its slices are resized to ``size`` (same extent)."""
    scale = np.array([shape[0] / size[0], shape[1] / size[1], 1.0])
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = (scale - 1.0) / 2.0  # voxel centres of align_corners=False resizing
    return np.asarray(affine, dtype=np.float64) @ step


def resize_inplane(vol: Volume, size: Sequence[int], *, mode: str = "bilinear") -> Volume:
    """A volume with every axial slice resized to ``size``, on a grid with the same extent."""
    return Volume(
        array=resize_slices(vol.array, size, mode=mode),
        affine=inplane_affine(vol.affine, vol.shape, size),
    )
