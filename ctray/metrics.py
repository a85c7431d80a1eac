"""Per-sample image metrics in Hounsfield units, shared by every family.

All functions take normalised tensors (B, 1, *spatial) in [0, 1] of a recorded HU window and
return one value per sample, so the train loop can average them across batches and workers.
PSNR and SSIM are computed on the windowed [0, 1] intensities (data range 1); the window is
reported beside them.
"""

from __future__ import annotations

import torch
from monai.metrics import PSNRMetric, SSIMMetric

from ctray.data.nifti import HUWindow

# Coarse organ classes stored in the shards' `labels` column (0 = outside the body).
LABEL_CLASSES: dict[str, int] = {
    "body": 1,
    "aorta": 2,
    "portal_vein": 3,
    "liver": 4,
    "kidney": 5,
    "spleen": 6,
    "ivc": 7,
    "pancreas": 8,
}
ROI_ORGANS: tuple[str, ...] = ("aorta", "portal_vein", "liver", "kidney")
MIN_ROI_VOXELS = 8


def mae_hu(
    pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor, window: HUWindow
) -> torch.Tensor:
    """Mean absolute error in HU inside ``mask`` (B,), NaN where the mask is empty."""
    err = (pred - truth).abs() * (window.hi - window.lo)
    m = mask.float()
    count = m.flatten(1).sum(1)
    total = (err * m).flatten(1).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(count, float("nan")))


def psnr(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """PSNR in dB on windowed intensities (data range 1), per sample."""
    return PSNRMetric(max_val=1.0, reduction="none")(pred.float(), truth.float()).reshape(-1)


def ssim(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """SSIM on windowed intensities (data range 1, Gaussian window <= 11 voxels), per sample."""
    win = [min(11, s) - (1 - min(11, s) % 2) for s in pred.shape[2:]]
    metric = SSIMMetric(spatial_dims=pred.ndim - 2, data_range=1.0, win_size=win, reduction="none")
    return metric(pred.float(), truth.float()).reshape(-1)


def roi_mean_error(
    pred: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor, organ: str, window: HUWindow
) -> torch.Tensor:
    """|mean HU of pred - mean HU of truth| inside one organ class, per sample (NaN if absent)."""
    m = (labels == LABEL_CLASSES[organ]).float()
    count = m.flatten(1).sum(1)
    scale = window.hi - window.lo
    mean_p = (pred * m).flatten(1).sum(1) / count.clamp_min(1) * scale
    mean_t = (truth * m).flatten(1).sum(1) / count.clamp_min(1) * scale
    err = (mean_p - mean_t).abs()
    return torch.where(count >= MIN_ROI_VOXELS, err, torch.full_like(err, float("nan")))


def image_metrics(
    pred: torch.Tensor,
    truth: torch.Tensor,
    labels: torch.Tensor,
    window: HUWindow,
    *,
    prefix: str = "",
    organs: tuple[str, ...] = ROI_ORGANS,
) -> dict[str, torch.Tensor]:
    """MAE (HU, inside the body), PSNR, SSIM and organ mean-HU errors for one prediction."""
    out = {
        f"{prefix}mae_hu": mae_hu(pred, truth, labels > 0, window),
        f"{prefix}psnr": psnr(pred, truth),
        f"{prefix}ssim": ssim(pred, truth),
    }
    for organ in organs:
        out[f"{prefix}roi_{organ}_hu"] = roi_mean_error(pred, truth, labels, organ, window)
    return out
