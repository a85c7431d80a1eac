"""The seed's multi-term reconstruction loss, plus projection consistency; each term weighted.

All terms take volumes (B, 1, X, Y, Z) in the HU window's [0, 1] and run in float32:

* ``l1``: mean absolute error.
* ``ssim``: 1 - 3D SSIM (MONAI ``SSIMLoss``, Gaussian window ``ssim_window``: the default
  11-voxel window fails on small grids, see DESIGN).
* ``edge``: L1 between 3D Sobel gradients (the three axes).
* ``fft``: L1 between 3D FFT magnitudes (orthonormal, so the scale does not depend on size).
* ``deep``: mean L1 of every coarser output against the target average-pooled to its scale.
* ``projection``: L1 between DRRs of the output (window -> HU -> attenuation, the model's
  view geometry) and the input views, both normalised per image like the training views.

The seed's VGG perceptual term cannot work here (no pretrained weights can be downloaded;
MONAI's ``PerceptualLoss`` needs lpips / torchvision / torch.hub): it is not offered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss

from ctray.data.drr import DRRGeometry, Projector, hu_to_mu, normalise_views
from ctray.data.nifti import HUWindow

from .config import XRay2CTConfig

_PROJECTORS: dict[tuple, Projector] = {}
_SSIM: dict[tuple, SSIMLoss] = {}


def projector(
    geometry: DRRGeometry,
    shape: Sequence[int],
    spacing: Sequence[float],
    device: torch.device,
    step_mm: float | None = None,
) -> Projector:
    """A cached projector (its sampling grid is built once per geometry, grid and device)."""
    key = (geometry, tuple(shape), tuple(spacing), str(device), step_mm)
    if key not in _PROJECTORS:
        if len(_PROJECTORS) > 8:
            _PROJECTORS.clear()
        _PROJECTORS[key] = Projector(geometry, shape, spacing, step_mm=step_mm).to(device)
    return _PROJECTORS[key]


def sobel_kernels(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(3, 1, 3, 3, 3) Sobel derivative kernels along x, y and z."""
    smooth = torch.tensor([1.0, 2.0, 1.0], device=device, dtype=dtype)
    diff = torch.tensor([-1.0, 0.0, 1.0], device=device, dtype=dtype)
    kernels = []
    for axis in range(3):
        parts = [diff if a == axis else smooth for a in range(3)]
        k = parts[0][:, None, None] * parts[1][None, :, None] * parts[2][None, None, :]
        kernels.append(k / 16.0)
    return torch.stack(kernels)[:, None]


def sobel(volume: torch.Tensor) -> torch.Tensor:
    """3D Sobel gradients (B, 3, X, Y, Z) of (B, 1, X, Y, Z) volumes (replicate padding)."""
    padded = F.pad(volume, (1, 1, 1, 1, 1, 1), mode="replicate")
    return F.conv3d(padded, sobel_kernels(volume.device, volume.dtype))


def edge_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(sobel(pred), sobel(target))


def fft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dims = (-3, -2, -1)
    mag_p = torch.fft.rfftn(pred, dim=dims, norm="ortho").abs()
    mag_t = torch.fft.rfftn(target, dim=dims, norm="ortho").abs()
    return F.l1_loss(mag_p, mag_t)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, window: int) -> torch.Tensor:
    win = min(window, *pred.shape[2:])
    win -= 1 - win % 2  # odd
    key = (win,)
    if key not in _SSIM:
        _SSIM[key] = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=win)
    return _SSIM[key](pred, target)


def deep_supervision_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean L1 of the coarser outputs against the target pooled to their scale."""
    terms = []
    for out in outputs:
        factor = target.shape[-1] // out.shape[-1]
        terms.append(F.l1_loss(out, F.avg_pool3d(target, factor)))
    return torch.stack(terms).mean() if terms else target.new_zeros(())


def reproject(
    volume: torch.Tensor,
    geometry: DRRGeometry,
    spacing: Sequence[float],
    window: HUWindow,
    step_mm: float | None = None,
) -> torch.Tensor:
    """Normalised DRRs (B, V, H, W) of windowed volumes (B, 1, X, Y, Z) (differentiable)."""
    mu = hu_to_mu(window.denormalise(volume[:, 0]), geometry.mu_water)
    proj = projector(geometry, volume.shape[-3:], spacing, volume.device, step_mm)
    return normalise_views(proj(mu))


def reconstruction_losses(
    outputs: Sequence[torch.Tensor],
    target: torch.Tensor,
    views: torch.Tensor,
    *,
    cfg: XRay2CTConfig,
    geometry: DRRGeometry,
    spacing: Sequence[float],
    window: HUWindow,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total and each (unweighted) term; zero-weight terms are not computed."""
    pred = outputs[0].float()
    target = target.float()
    terms: dict[str, torch.Tensor] = {"l1": F.l1_loss(pred, target)}
    if cfg.w_ssim:
        terms["ssim"] = ssim_loss(pred, target, cfg.ssim_window)
    if cfg.w_edge:
        terms["edge"] = edge_loss(pred, target)
    if cfg.w_fft:
        terms["fft"] = fft_loss(pred, target)
    if cfg.w_deep and len(outputs) > 1:
        terms["deep"] = deep_supervision_loss([o.float() for o in outputs[1:]], target)
    if cfg.w_projection:
        drrs = reproject(pred, geometry, spacing, window, cfg.projection_step_mm)
        terms["projection"] = F.l1_loss(drrs, views.float())
    weights = {
        "l1": cfg.w_l1,
        "ssim": cfg.w_ssim,
        "edge": cfg.w_edge,
        "fft": cfg.w_fft,
        "deep": cfg.w_deep,
        "projection": cfg.w_projection,
    }
    total = sum(weights[k] * v for k, v in terms.items())
    if "deep" not in terms and len(outputs) > 1:
        # Keep the coarse heads in the graph: DDP refuses parameters without gradients.
        total = total + 0.0 * sum(o.float().mean() for o in outputs[1:])
    return total, terms
