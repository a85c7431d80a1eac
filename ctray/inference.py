"""Whole-volume prediction for any family: NIfTI geometry in, the same geometry out.

The model sees what it was trained on (canonical RAS, training spacing, the recorded HU
window, patch-sized windows); the caller gets a volume on the input's own grid and affine.
The model's change (prediction minus the windowed input) is resampled back and added to the
original voxels, so intensities outside the window (bone above it, air below it) and voxels
the model leaves alone come back exactly as they went in.

2D slice models (``DataInfo.resize_inplane``, patch (H, W, 1)) run through the same path: each
axial slice is resized in-plane to (H, W) (z keeps the input's slices), the inferer's windows are
whole slices, batched ``sw_batch_size`` at a time, and the change is resized back.

Models whose output grid differs (``DataInfo.output_scale``, e.g. 5 thin slices per thick one)
return ``output_scale`` times larger windows, which MONAI's inferer stitches at that zoom; the
result is resampled onto the input's own grid refined by ``output_scale`` (:func:`refine_grid`:
same world extent, origin and directions, ``output_scale`` times finer), in canonical RAS voxel
order. Intensities outside the HU window come back from the input, interpolated to that grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from ctray.data.grid import refine_grid
from ctray.data.nifti import (
    HUWindow,
    Volume,
    canonical_ras,
    resample_like,
    resample_to_spacing,
    undo_canonical,
)
from ctray.data.slices import resize_inplane
from ctray.modeldir import LoadedModel


def _sliding_window(
    model: LoadedModel,
    x: torch.Tensor,
    cond: Mapping[str, Any],
    *,
    overlap: float,
    sw_batch_size: int,
) -> torch.Tensor:
    # Whole-slice windows never overlap: constant weights keep the stitching exact.
    slices = model.data.resize_inplane
    inferer = SlidingWindowInferer(
        roi_size=model.data.patch_size,
        sw_batch_size=sw_batch_size,
        overlap=0.0 if slices else overlap,
        mode="constant" if slices else "gaussian",
        padding_mode="replicate",
    )

    def predictor(window: torch.Tensor) -> torch.Tensor:
        return model.spec.predict(model.models, window, model.config, cond)

    return inferer(x, predictor)


@torch.no_grad()
def predict_volumes(
    model: LoadedModel,
    volumes: list[Volume],
    conditions: list[Mapping[str, Any]],
    *,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
) -> list[Volume]:
    """Predict several volumes (float32 HU with their affines); conditions are parsed.

    Same-grid models return each volume on its input grid and affine; others on the refined
    grid of :func:`refine_grid`. Volumes that share a resampled shape and condition run as one
    batch (Serve's dynamic batching relies on this); others run one by one.
    """
    window = HUWindow(**model.data.window)
    device = next(next(iter(model.models.values())).parameters()).device
    prepared = []
    for vol in volumes:
        ras, ornt = canonical_ras(vol)
        if model.data.resize_inplane:
            res = resize_inplane(ras, model.data.patch_size[:2])
        else:
            res = resample_to_spacing(ras, model.data.spacing)
        prepared.append((ras, ornt, res, window.normalise(res.array.astype(np.float32))))
    outputs: list[Volume | None] = [None] * len(volumes)
    groups: dict[tuple, list[int]] = {}
    for i, (_, _, res, _) in enumerate(prepared):
        # str(v): one parser per key gives one type, and floats (a temperature) or None (a
        # model-default setting) keep their identity.
        key = (res.shape, tuple(sorted((k, str(v)) for k, v in conditions[i].items())))
        groups.setdefault(key, []).append(i)
    for indices in groups.values():
        x = torch.from_numpy(np.stack([prepared[i][3] for i in indices]))[:, None].to(device)
        y = _sliding_window(
            model, x, conditions[indices[0]], overlap=overlap, sw_batch_size=sw_batch_size
        )
        if not model.data.same_grid:
            for i, out in zip(indices, y.float().cpu().numpy()[:, 0], strict=True):
                outputs[i] = _on_refined_grid(out, prepared[i][0], prepared[i][2], model, window)
            continue
        deltas = (y.float() - x).cpu().numpy()[:, 0] * window.width
        for i, delta in zip(indices, deltas, strict=True):
            ras, ornt, res, _ = prepared[i]
            back = resample_like(
                delta, res.affine, target_affine=ras.affine, target_shape=ras.shape
            )
            array = (volumes[i].array + undo_canonical(back, ornt)).astype(np.float32)
            outputs[i] = Volume(array=array, affine=volumes[i].affine)
    return outputs  # type: ignore[return-value]


def _on_refined_grid(
    y: np.ndarray, ras: Volume, res: Volume, model: LoadedModel, window: HUWindow
) -> Volume:
    """A new-grid model's output (normalised, on the refined working grid) on the refined
    input grid, with the input's out-of-window intensities added back."""
    scale = model.data.output_scale
    work_affine, _ = refine_grid(res.affine, res.shape, scale)
    affine, shape = refine_grid(ras.affine, ras.shape, scale)
    pred = resample_like(
        window.denormalise(y), work_affine, target_affine=affine, target_shape=shape
    )
    base = resample_like(
        ras.array.astype(np.float32), ras.affine, target_affine=affine, target_shape=shape
    )
    beyond = base - np.clip(base, window.lo, window.hi)
    return Volume(array=(pred + beyond).astype(np.float32), affine=affine)


def predict_volume(
    model: LoadedModel, volume: Volume, conditioning: Mapping[str, Any], **kw: Any
) -> Volume:
    """Predict one volume; ``conditioning`` holds user-typed strings (e.g. target_phase=venous)."""
    cond = model.spec.parse_conditioning(conditioning)
    return predict_volumes(model, [volume], [cond], **kw)[0]


@torch.no_grad()
def predict_views(
    model: LoadedModel, views: list[list[np.ndarray]], conditions: list[Mapping[str, Any]]
) -> list[Volume]:
    """Predict volumes from 2D views (families with ``FamilySpec.views``), one list per request.

    Each request's views go through the family's ``prepare`` (count, size, normalisation; a
    ValueError says what is expected); requests with the same condition run as one batch. The
    result is in HU on the family's documented output grid.
    """
    hook = model.spec.views
    if hook is None:
        raise ValueError(f"model {model.name!r} ({model.spec.name}) takes a volume, not views")
    window = HUWindow(**model.data.window)
    device = next(next(iter(model.models.values())).parameters()).device
    affine, shape = hook.output_grid(model.config, model.data)
    prepared = [hook.prepare(list(v), model.config, model.data) for v in views]
    outputs: list[Volume | None] = [None] * len(views)
    groups: dict[tuple, list[int]] = {}
    for i, cond in enumerate(conditions):
        groups.setdefault(tuple(sorted((k, str(v)) for k, v in cond.items())), []).append(i)
    for indices in groups.values():
        x = torch.cat([prepared[i] for i in indices]).to(device)
        y = model.spec.predict(model.models, x, model.config, conditions[indices[0]])
        for i, out in zip(indices, y.float().cpu().numpy()[:, 0], strict=True):
            if out.shape != tuple(shape):
                raise RuntimeError(f"{model.spec.name}.predict returned {out.shape}, not {shape}")
            hu = window.denormalise(out).astype(np.float32)
            outputs[i] = Volume(array=hu, affine=np.asarray(affine, dtype=np.float64))
    return outputs  # type: ignore[return-value]
