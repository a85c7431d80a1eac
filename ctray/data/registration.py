"""Small rigid registration in torch, for aligning the phases of one patient before a loss.

Semi-paired phases (seed 000) differ by a few millimetres and degrees of patient motion; a
voxel-wise loss against such a target rewards blurring or doing nothing. :func:`rigid_register`
finds the 6-parameter rigid motion (three rotations about the volume centre, three translations
in mm) that best maps a fixed volume's voxels into a moving volume, by gradient descent on a
robust intensity difference over a coarse-to-fine pyramid; :func:`resample` then brings the
moving volume onto the fixed grid. Contrast enhancement changes only a few organs, bone, air
and fat do not, so a robust (Charbonnier) difference of windowed intensities is a sound
criterion between contrast phases; the few enhancing voxels act as outliers.

Transforms are 4x4 homogeneous matrices on voxel indices, in the convention of
``scipy.ndimage.affine_transform``: ``T @ [i, j, k, 1]`` is where the fixed voxel ``(i, j, k)``
samples the moving volume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["displacement_mm", "resample", "rigid_register", "rotation_matrix"]


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """R = Rz @ Ry @ Rx of three angles (radians), differentiable."""
    a, b, c = angles.unbind()
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    rx = torch.stack([one, zero, zero, zero, a.cos(), -a.sin(), zero, a.sin(), a.cos()])
    ry = torch.stack([b.cos(), zero, b.sin(), zero, one, zero, -b.sin(), zero, b.cos()])
    rz = torch.stack([c.cos(), -c.sin(), zero, c.sin(), c.cos(), zero, zero, zero, one])
    return rz.reshape(3, 3) @ ry.reshape(3, 3) @ rx.reshape(3, 3)


def _voxel_transform(
    angles: torch.Tensor, shift_mm: torch.Tensor, spacing: torch.Tensor, centre: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(matrix, offset) on voxel indices of a rotation about ``centre`` plus a shift in mm."""
    matrix = rotation_matrix(angles) * spacing[None, :] / spacing[:, None]  # S^-1 R S
    offset = centre - matrix @ centre + shift_mm / spacing
    return matrix, offset


def _pool(volume: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool3d(volume, factor, ceil_mode=True) if factor > 1 else volume


def rigid_register(
    fixed: np.ndarray,
    moving: np.ndarray,
    spacing: Sequence[float],
    *,
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
    window: tuple[float, float] = (-1000.0, 1000.0),
    levels: Sequence[int] = (4, 2, 1),
    iterations: Sequence[int] = (80, 40, 20),
    lr: float = 0.05,
    max_points: int = 20_000,
    seed: int = 0,
) -> np.ndarray:
    """Rigid transform (4x4, voxel indices) mapping ``fixed`` voxels into ``moving``.

    Args:
        fixed / moving: volumes in HU on grids of the same spacing (shapes may differ).
        spacing: voxel size in mm (the rotation is rigid in mm, not in voxels).
        fixed_mask / moving_mask: where each volume holds data (e.g. its z-coverage); the loss
            ignores voxels outside either.
        window: HU range the intensities are clipped to.
        levels: pyramid downsampling factors, coarse to fine.
        iterations: Adam iterations per level.
        lr: Adam step on the parameters (angles in units of 0.1 rad, shifts in units of 10 mm
            at the finest level; the units keep both at comparable sizes).
        max_points: each iteration of a level with more valid voxels than this uses a fresh
            random subset of them (stochastic gradient descent, as ITK's samplers do).
        seed: seeds that subset.

    Returns:
        float64 (4, 4) matrix; use it with :func:`resample`.
    """
    if len(levels) != len(iterations):
        raise ValueError("levels and iterations must have the same length")
    with _one_thread():
        return _fit(
            fixed, moving, spacing, fixed_mask, moving_mask, window, levels, iterations, lr,
            max_points, seed,
        )  # fmt: skip


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny tensors: extra intra-op threads only contend with other work on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(
    fixed: np.ndarray,
    moving: np.ndarray,
    spacing: Sequence[float],
    fixed_mask: np.ndarray | None,
    moving_mask: np.ndarray | None,
    window: tuple[float, float],
    levels: Sequence[int],
    iterations: Sequence[int],
    lr: float,
    max_points: int,
    seed: int,
) -> np.ndarray:
    lo, hi = window
    sp = torch.tensor(list(spacing), dtype=torch.float32)

    def prep(a: np.ndarray, mask: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(np.clip(a, lo, hi), dtype=torch.float32)
        t = ((t - lo) / (hi - lo))[None, None]
        m = torch.ones_like(t) if mask is None else torch.as_tensor(mask, dtype=torch.float32)
        return t, m.reshape(t.shape)

    fix, fix_m = prep(fixed, fixed_mask)
    mov, mov_m = prep(moving, moving_mask)
    # Rotations (x 0.1 rad) and translations (x 10 mm): scaled so one Adam step moves both alike.
    params = torch.zeros(6, requires_grad=True)
    gen = torch.Generator().manual_seed(seed)
    centre_f = (torch.tensor(fixed.shape, dtype=torch.float32) - 1) / 2
    centre_m = (torch.tensor(moving.shape, dtype=torch.float32) - 1) / 2
    with torch.no_grad():
        params[3:] = (centre_m - centre_f) * sp / 10.0  # start: centres coincide
    for factor, iters in zip(levels, iterations, strict=True):
        f, fm = _pool(fix, factor), _pool(fix_m, factor)
        m, mm = _pool(mov * mov_m, factor), _pool(mov_m, factor)
        m = m / mm.clamp_min(1e-6)  # mean of the valid voxels only
        # Fixed voxel centres of this level, in full-resolution voxel indices.
        axes = [(torch.arange(n, dtype=torch.float32) + 0.5) * factor - 0.5 for n in f.shape[2:]]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        inside = fm.reshape(-1) > 0.99
        grid, values = grid[inside], f.reshape(-1)[inside]
        size_m = torch.tensor(m.shape[2:], dtype=torch.float32)
        opt = torch.optim.Adam([params], lr=lr)
        for it in range(iters):
            for group in opt.param_groups:  # linear decay to a tenth: settles the noisy steps
                group["lr"] = lr * (1.0 - 0.9 * it / max(iters - 1, 1))
            if len(values) > max_points:
                pick = torch.randint(len(values), (max_points,), generator=gen)
                points, target = grid[pick], values[pick]
            else:
                points, target = grid, values
            matrix, offset = _voxel_transform(params[:3] * 0.1, params[3:] * 10.0, sp, centre_f)
            q = points @ matrix.T + offset  # moving full-res voxel indices
            q = (q + 0.5) / factor - 0.5  # -> this level's voxel indices
            norm = 2 * q / (size_m - 1).clamp_min(1) - 1
            g = norm.flip(-1).reshape(1, 1, 1, -1, 3)  # grid_sample wants (z, y, x) = (W, H, D)
            sampled = F.grid_sample(m, g, align_corners=True, padding_mode="border").reshape(-1)
            valid = (F.grid_sample(mm, g, align_corners=True).reshape(-1) > 0.99).float()
            diff = sampled - target
            loss = (torch.sqrt(diff * diff + 1e-4) * valid).sum() / valid.sum().clamp_min(1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        matrix, offset = _voxel_transform(params[:3] * 0.1, params[3:] * 10.0, sp, centre_f)
    out = np.eye(4)
    out[:3, :3] = matrix.double().numpy()
    out[:3, 3] = offset.double().numpy()
    return out


def resample(
    moving: np.ndarray,
    transform: np.ndarray,
    shape: Sequence[int] | None = None,
    *,
    order: int = 1,
    mode: str = "constant",
    cval: float = 0.0,
) -> np.ndarray:
    """``moving`` on the fixed grid (``shape``, default its own) through a 4x4 voxel transform.

    ``mode`` and ``cval`` say what lies outside ``moving`` (as in scipy.ndimage).
    """
    return ndimage.affine_transform(
        moving,
        transform[:3, :3],
        offset=transform[:3, 3],
        output_shape=tuple(shape or moving.shape),
        order=order,
        mode=mode,
        cval=cval,
        output=np.float32,
    )


def displacement_mm(
    estimated: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    *,
    max_points: int = 20_000,
) -> float:
    """Mean distance (mm) between where two voxel transforms send the voxels of ``mask``.

    At most about ``max_points`` voxels are used (a regular subset of the mask).
    """
    idx = np.argwhere(mask).astype(np.float64)
    idx = idx[:: max(1, len(idx) // max_points)]
    if len(idx) == 0:
        return float("nan")
    diff = idx @ (estimated[:3, :3] - truth[:3, :3]).T + (estimated[:3, 3] - truth[:3, 3])
    return float(np.linalg.norm(diff * np.asarray(spacing, dtype=np.float64), axis=1).mean())
