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
# Every organ class is one that contrast enhances (the body class is everything else).
ROI_ORGANS: tuple[str, ...] = (
    "aorta",
    "portal_vein",
    "ivc",
    "liver",
    "spleen",
    "kidney",
    "pancreas",
)
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


def organ_mae_hu(
    pred: torch.Tensor,
    truth: torch.Tensor,
    labels: torch.Tensor,
    window: HUWindow,
    organs: tuple[str, ...] = ROI_ORGANS,
) -> torch.Tensor:
    """Voxel MAE (HU) of each organ present (>= MIN_ROI_VOXELS), averaged over those organs.

    Each organ weighs the same whatever its size, so a model that ignores the aorta cannot
    hide it behind the liver. NaN where no organ is present.
    """
    per_organ = []
    for organ in organs:
        m = labels == LABEL_CLASSES[organ]
        count = m.float().flatten(1).sum(1)
        err = mae_hu(pred, truth, m, window)
        per_organ.append(torch.where(count >= MIN_ROI_VOXELS, err, torch.nan))
    stacked = torch.stack(per_organ, dim=1)
    return stacked.nanmean(dim=1)


def balanced_mae_hu(
    pred: torch.Tensor,
    truth: torch.Tensor,
    labels: torch.Tensor,
    window: HUWindow,
    organs: tuple[str, ...] = ROI_ORGANS,
) -> torch.Tensor:
    """Mean of :func:`organ_mae_hu` and the MAE in the rest of the body, per sample (HU).

    Contrast changes a few organs and leaves the rest of the body as it is: whole-body MAE is
    dominated by the unchanged voxels (it rewards doing nothing), organ errors alone reward
    changing everything. Weighing both halves equally scores the enhancement of every organ and
    the preservation of everything else. Falls back to the rest-of-body MAE without organs.
    """
    organ_classes = torch.tensor([LABEL_CLASSES[o] for o in organs], device=labels.device)
    rest = (labels > 0) & ~torch.isin(labels, organ_classes)
    both = torch.stack(
        (organ_mae_hu(pred, truth, labels, window, organs), mae_hu(pred, truth, rest, window)), 1
    )
    return both.nanmean(dim=1)


def split_by_group(
    metrics: dict[str, torch.Tensor], group: torch.Tensor, names: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Per-sample metrics copied to ``<name>/<key>`` for each group name, NaN elsewhere.

    ``group`` (B,) holds each sample's index into ``names`` (e.g. its target phase). Every
    name gets every key (NaN where a batch has none of that group), so all workers reduce the
    same keys; the loop's mean ignores NaN.
    """
    out: dict[str, torch.Tensor] = {}
    for index, name in enumerate(names):
        mine = group.reshape(-1) == index
        for key, values in metrics.items():
            out[f"{name}/{key}"] = torch.where(mine, values.float(), torch.nan)
    return out


def image_metrics(
    pred: torch.Tensor,
    truth: torch.Tensor,
    labels: torch.Tensor,
    window: HUWindow,
    *,
    prefix: str = "",
    organs: tuple[str, ...] = ROI_ORGANS,
) -> dict[str, torch.Tensor]:
    """MAE (HU, inside the body), PSNR, SSIM and organ mean-HU errors for one prediction.

    With organs, also the organ-wise and balanced MAE (:func:`balanced_mae_hu`).
    """
    out = {
        f"{prefix}mae_hu": mae_hu(pred, truth, labels > 0, window),
        f"{prefix}psnr": psnr(pred, truth),
        f"{prefix}ssim": ssim(pred, truth),
    }
    for organ in organs:
        out[f"{prefix}roi_{organ}_hu"] = roi_mean_error(pred, truth, labels, organ, window)
    if organs:
        out[f"{prefix}organ_mae_hu"] = organ_mae_hu(pred, truth, labels, window, organs)
        out[f"{prefix}balanced_mae_hu"] = balanced_mae_hu(pred, truth, labels, window, organs)
    return out
