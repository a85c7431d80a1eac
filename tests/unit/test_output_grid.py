"""The output-grid rule: refined affines overlay the input, and inference returns that grid."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ctray.config import from_dict
from ctray.data.grid import refine_grid
from ctray.data.nifti import Volume
from ctray.inference import predict_volume
from ctray.modeldir import LoadedModel
from ctray.registry import DataInfo, get_family
from ctray.serve.errors import ApiError
from ctray.serve.handling import check_output_size

WINDOW = {"lo": -1000.0, "hi": 1000.0}


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (affine[:3, :3] @ ijk.T).T + affine[:3, 3]


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(20)
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 0.8, 5.0])
    affine[:3, 3] = [-100.0, 40.0, 12.5]
    return affine


@pytest.mark.parametrize("scale", [(1, 1, 5), (1, 1, 3), (2, 2, 2), (1, 1, 1)])
def test_refined_grid_covers_the_same_world_extent(scale) -> None:
    affine, shape = _oblique_affine(), (6, 7, 8)
    out, out_shape = refine_grid(affine, shape, scale)
    assert out_shape == tuple(n * f for n, f in zip(shape, scale, strict=True))
    # The outer faces (voxel coordinate -0.5 and n - 0.5) are the same world points.
    lo_in = _world(affine, np.array([[-0.5, -0.5, -0.5]]))
    hi_in = _world(affine, np.array(shape, float)[None] - 0.5)
    lo_out = _world(out, np.array([[-0.5, -0.5, -0.5]]))
    hi_out = _world(out, np.array(out_shape, float)[None] - 0.5)
    np.testing.assert_allclose(lo_out, lo_in, atol=1e-9)
    np.testing.assert_allclose(hi_out, hi_in, atol=1e-9)
    # The mean centre of the outputs inside input voxel k is the centre of voxel k.
    f = np.array(scale)
    k = np.array([[2, 3, 4]])
    centres = _world(out, k * f + (f - 1) / 2.0)
    np.testing.assert_allclose(centres, _world(affine, k), atol=1e-9)
    # Directions are kept, spacing divided.
    np.testing.assert_allclose(
        np.linalg.norm(out[:3, :3], axis=0), np.array([0.8, 0.8, 5.0]) / f, atol=1e-12
    )


class RepeatSlices(nn.Module):
    """A stand-in thin-slice model: each thick slice repeated ``factor`` times."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.factor, dim=-1)


def _model(factor: int, patch=(16, 16, 4)) -> LoadedModel:
    base = get_family("pix2pix")
    spec = dataclasses.replace(
        base, predict=lambda models, x, cfg, cond: models["generator"](x), conditioning={}
    )
    data = DataInfo(
        patch_size=patch, spacing=(2.0, 2.0, 6.0), window=WINDOW, output_scale=(1, 1, factor)
    )
    return LoadedModel(
        name="repeat",
        path=Path("."),
        spec=spec,
        config=from_dict(base.config_cls, {}),
        data=data,
        metrics={},
        meta={},
        models={"generator": RepeatSlices(factor)},
    )


def test_inference_returns_the_refined_grid_with_out_of_window_values() -> None:
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 300, (20, 18, 7)).astype(np.float32).clip(-990, 990)
    arr[3, 4, 2] = 1800.0  # bone above the window comes back
    affine = np.diag([2.0, 2.0, 6.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    out = predict_volume(_model(3), Volume(array=arr, affine=affine), {})
    expected_affine, expected_shape = refine_grid(affine, arr.shape, (1, 1, 3))
    assert out.array.shape == expected_shape == (20, 18, 21)
    np.testing.assert_allclose(out.affine, expected_affine, atol=1e-9)
    # Nearest-slice model on the model's own spacing: every thin slice equals its thick slice
    # (windows stitched without seams: constant along the thin slices of each thick one).
    # The HU above the window are the input's, linearly interpolated onto the thin slices, so
    # the bone voxel's own column is left out of the comparison.
    inner = out.array[:, :, 3:-3].copy()
    expected = np.repeat(arr, 3, axis=2)[:, :, 3:-3]
    inner[3, 4], expected[3, 4] = 0.0, 0.0
    np.testing.assert_allclose(inner, expected, atol=2.0)
    assert out.array[3, 4, 7] == pytest.approx(1800.0, abs=5.0)


def test_output_size_is_refused_before_any_work() -> None:
    check_output_size((1, 1, 5), (100, 100, 40), 2_000_000)
    with pytest.raises(ApiError, match="output would have 2,000,005"):
        check_output_size((1, 1, 5), (1, 400_001, 1), 2_000_000)
