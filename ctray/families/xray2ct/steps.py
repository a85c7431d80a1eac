"""Build, train, evaluate and predict for xray2ct; the generic loop calls these.

Training: AdamW, linear warm-up over ``warmup_steps`` optimiser steps then cosine decay over
the epochs (set from ``ctx.step`` / ``ctx.epoch`` in every step: no scheduler state to
resume), gradient clipping 1.0 through the stage's loop defaults, bf16 autocast on CUDA by the
loop. Every batch is checked against the model's view geometry, and the model's views are
picked from the rendered ones by angle.

Validation (per sample; PSNR and SSIM on the manifest's HU window, MAE in HU inside the body,
HU > -500) for the model and two baselines: ``mean_*`` (the mean training volume, a buffer the
training steps fill) and ``backprojection_*`` (the unfiltered back-projection of the views,
mapped to the target by a per-volume least-squares fit ``a * bp + b`` against the truth: an
optimistic, truth-scaled baseline that shows how much a plain back-projection explains).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ctray.data.drr import DRRGeometry, Projector, hu_to_mu, view_name
from ctray.data.images import FORMATS, SUFFIXES
from ctray.data.nifti import HUWindow, Volume, canonical_ras
from ctray.metrics import image_metrics
from ctray.optim import set_lr
from ctray.registry import Batch, DataInfo, Models, Optimizers, StepContext

from .config import XRay2CTConfig
from .data import grid_affine, prepare_views, resample_to_grid
from .losses import reconstruction_losses, reproject
from .model import XRay2CT

GEOMETRY_RTOL = 1e-4


def build_models(cfg: XRay2CTConfig, data: DataInfo) -> Models:
    size = tuple(int(p) for p in data.patch_size)
    if len(size) != 3:
        raise ValueError(f"xray2ct outputs 3D volumes: patch_size must be (X, Y, Z), got {size}")
    return {"net": XRay2CT(cfg, size, tuple(data.spacing))}


def build_optimizers(cfg: XRay2CTConfig, models: Models) -> Optimizers:
    params = models["net"].parameters()
    return {"net": torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)}


def lr_at(cfg: XRay2CTConfig, step: int, epoch: int, num_epochs: int) -> float:
    """Linear warm-up over the first steps, then cosine over the epochs to min_lr_ratio."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    progress = epoch / max(1, num_epochs)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def _bare(net: torch.nn.Module) -> XRay2CT:
    return getattr(net, "module", net)


def select_views(batch: Batch, geometry: DRRGeometry, device: torch.device) -> torch.Tensor:
    """The model's views (B, V, H, W) from the rendered ones, by angle; geometry checked."""
    rendered = batch["angles"][0].detach().cpu().double().numpy()
    vector = batch["geometry"][0].detach().cpu().double().numpy()
    want = np.asarray(geometry.as_vector(), dtype=np.float64)
    if vector.shape != want.shape or not np.allclose(vector, want, rtol=GEOMETRY_RTOL):
        names = ("cone", "sid_mm", "sdd_mm", "rows", "columns", "pixel_h", "pixel_w", "mu_water")
        diff = {n: (round(float(a), 4), round(float(b), 4))
                for n, a, b in zip(names, vector, want, strict=False)
                if not np.isclose(a, b, rtol=GEOMETRY_RTOL)}  # fmt: skip
        raise ValueError(
            "the shards' X-ray geometry differs from the model's (shards, model): "
            f"{diff}; build the model with the geometry of the shards' manifest "
            "(build.family_options) or rebuild the shards"
        )
    index = []
    for angle in geometry.angles:
        gap = np.abs((rendered - angle + 180.0) % 360.0 - 180.0)
        k = int(np.argmin(gap))
        if gap[k] > 1e-3:
            raise ValueError(
                f"the model's view angle {angle:g} deg was not rendered into these shards "
                f"(they hold {', '.join(f'{a:g}' for a in rendered)} deg); pick the model's "
                "num_views / view_angles among those or rebuild with option rendered_angles=[...]"
            )
        index.append(k)
    views = batch["views"].to(device=device, dtype=torch.float32)
    return views[:, index]


def _volume(batch: Batch, key: str, device: torch.device) -> torch.Tensor:
    return batch[key].to(device=device, dtype=torch.float32).unsqueeze(1)


def train_step(ctx: StepContext, batch: Batch) -> dict[str, float]:
    cfg: XRay2CTConfig = ctx.config
    net = ctx.models["net"]
    bare = _bare(net)
    lr = lr_at(cfg, ctx.step, ctx.epoch, ctx.num_epochs)
    set_lr(ctx.optimizers.values(), lr)
    views = select_views(batch, bare.geometry, ctx.device)
    ct = _volume(batch, "ct", ctx.device)
    bare.update_mean(ct)
    with ctx.autocast():
        outputs = net(views)
    total, terms = reconstruction_losses(
        outputs,
        ct,
        views,
        cfg=cfg,
        geometry=bare.geometry,
        spacing=ctx.data.spacing,
        window=HUWindow(**ctx.data.window),
    )
    ctx.optimize(total, "net")
    out = {"loss/total": float(total.detach()), "lr": lr}
    out.update({f"loss/{k}": float(v.detach()) for k, v in terms.items()})
    return out


def fitted_backprojection(bp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``a * bp + b`` per volume, least-squares fitted to ``target``, clamped to [0, 1]."""
    x, y = bp.flatten(1).float(), target.flatten(1).float()
    xm, ym = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
    cov = ((x - xm) * (y - ym)).mean(1, keepdim=True)
    var = ((x - xm) ** 2).mean(1, keepdim=True).clamp_min(1e-12)
    a = cov / var
    return (a * (x - xm) + ym).clamp(0, 1).view_as(bp)


def eval_step(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """Per-volume MAE (HU, body), PSNR, SSIM of the model and the mean / back-projection."""
    window = HUWindow(**ctx.data.window)
    net = ctx.models["net"]
    bare = _bare(net)
    views = select_views(batch, bare.geometry, ctx.device)
    ct = _volume(batch, "ct", ctx.device)
    body = batch["body"].to(ctx.device).unsqueeze(1)
    with ctx.autocast():
        pred = net(views)[0]
    pred = pred.float().clamp(0, 1)
    metrics = image_metrics(pred, ct, body, window, organs=())
    drrs = reproject(pred, bare.geometry, ctx.data.spacing, window)
    metrics["projection_l1"] = (drrs - views).abs().flatten(1).mean(1)
    mean = bare.mean_ct.float().clamp(0, 1).expand_as(ct)
    metrics.update(image_metrics(mean, ct, body, window, prefix="mean_", organs=()))
    bp = fitted_backprojection(bare.backprojection(views), ct)
    metrics.update(image_metrics(bp, ct, body, window, prefix="backprojection_", organs=()))
    return metrics


def predict(
    models: Models, views: torch.Tensor, cfg: XRay2CTConfig, cond: Mapping[str, Any]
) -> torch.Tensor:
    """Views (B, V, H, W), prepared like ``views.prepare`` -> volumes (B, 1, X, Y, Z) in [0, 1]."""
    return models["net"](views.float())[0].float().clamp(0, 1)


def preview(models: Models, batch: Batch, cfg: XRay2CTConfig) -> tuple[torch.Tensor, ...]:
    """(back-projection, output, target) of the first sample, as (X, Y, Z) volumes."""
    net = _bare(models["net"])
    device = net.mean_ct.device
    views = select_views(batch, net.geometry, device)[:1]
    bp = net.backprojection(views)[0, 0]
    bp = (bp - bp.min()) / (bp.max() - bp.min()).clamp_min(1e-6)
    pred = predict(models, views, cfg, {})[0, 0]
    return bp, pred, _volume(batch, "ct", device)[0, 0]


# --------------------------------------------------------------------------- view inputs


def describe_views(cfg: XRay2CTConfig, data: DataInfo) -> dict[str, Any]:
    """What a client must send: count, names in order, angles, geometry, image size, formats."""
    geometry = cfg.model_geometry(data.patch_size, data.spacing)
    names = [view_name(a) for a in geometry.angles]
    _, shape = output_grid(cfg, data)
    return {
        "count": geometry.views,
        "names": names,
        "angles_deg": [float(a) for a in geometry.angles],
        "geometry": geometry.describe(),
        "image_size": list(geometry.detector),
        "formats": list(FORMATS),
        "suffixes": list(SUFFIXES),
        "conventions": (
            "images are (rows, columns) as seen from the source, row 0 at the patient's "
            "superior end; gantry angle 0 = AP (source anterior), 90 = source on the patient's "
            "right; attenuation polarity (bone bright); any size within 10% of the detector's "
            "aspect ratio is resized to it; each image is normalised to its 0.5/99.5 "
            "percentiles; the isocentre is the centre of the returned volume"
        ),
        "output": {"shape": list(shape), "spacing_mm": list(data.spacing), "frame": "RAS"},
    }


def prepare_view_inputs(arrays: list[Any], cfg: XRay2CTConfig, data: DataInfo) -> torch.Tensor:
    """Decoded 2D arrays in upload order -> (1, V, H, W) views for :func:`predict`."""
    geometry = cfg.model_geometry(data.patch_size, data.spacing)
    return prepare_views(arrays, geometry)


def output_grid(cfg: XRay2CTConfig, data: DataInfo) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RAS affine and shape of the returned volume: ``data.spacing`` voxels, its centre at the
    world origin (the isocentre of the views)."""
    shape = tuple(int(p) for p in data.patch_size)
    return grid_affine(shape, data.spacing), shape  # type: ignore[return-value]


RENDER_OVERSAMPLE = 2


def render_view_inputs(ct: Volume, cfg: XRay2CTConfig, data: DataInfo) -> dict[str, np.ndarray]:
    """The views a model expects, rendered from a CT: {view name: line integrals (H, W)}.

    The CT (canonical RAS) is resampled onto the model's output box centred on its volume
    centre, on a grid twice as fine (air outside the scan), and projected noise-free in the
    model's geometry, as the training views were (less their quantum noise). ``prepare``
    normalises them per image.
    """
    geometry = cfg.model_geometry(data.patch_size, data.spacing)
    shape = tuple(int(p) * RENDER_OVERSAMPLE for p in data.patch_size)
    spacing = tuple(float(s) / RENDER_OVERSAMPLE for s in data.spacing)
    ras, _ = canonical_ras(ct)
    hu = resample_to_grid(ras, shape, spacing)
    with torch.no_grad():
        lines = Projector(geometry, shape, spacing)(hu_to_mu(hu[None], geometry.mu_water))[0]
    return {
        view_name(a): lines[i].numpy().astype(np.float32) for i, a in enumerate(geometry.angles)
    }
