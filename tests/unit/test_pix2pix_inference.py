"""A 2D slice model over 3D volumes through the generic inference path."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from ctray.config import from_dict
from ctray.data.nifti import HUWindow, Volume, canonical_ras, load_nifti, save_nifti
from ctray.data.slices import resize_slices
from ctray.families.pix2pix.config import Pix2PixConfig
from ctray.families.pix2pix.data import phantom_pair
from ctray.families.pix2pix.evaluate import evaluate_pair, mean_metrics
from ctray.families.pix2pix.spec import SPEC
from ctray.inference import predict_volume
from ctray.modeldir import LoadedModel
from ctray.registry import DataInfo

WINDOW = {"lo": -1000.0, "hi": 1000.0}


class SpyIdentity(nn.Module):
    """An identity generator that records the slices it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # so the model has a device
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x


def _model(generator: nn.Module, size: int = 32) -> LoadedModel:
    data = DataInfo(
        patch_size=(size, size, 1), spacing=(9.0, 9.0, 9.0), window=WINDOW, resize_inplane=True
    )
    cfg = from_dict(Pix2PixConfig, SPEC.preset("debug"))
    return LoadedModel(
        name="t",
        path=Path("."),
        spec=SPEC,
        config=cfg,
        data=data,
        metrics={},
        meta={},
        models={"generator": generator},
    )


def _lps_volume() -> Volume:
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 400, (40, 28, 7)).astype(np.float32)
    arr[0, 0, :] = 2500.0  # outside the window: must come back unclipped
    affine = np.diag([-1.5, -1.5, 4.0, 1.0])
    affine[:3, 3] = (30.0, 20.0, -10.0)
    return Volume(array=arr, affine=affine)


def test_identity_generator_round_trips_volume_and_affine(tmp_path: Path) -> None:
    vol = _lps_volume()
    spy = SpyIdentity()
    out = predict_volume(_model(spy), vol, {}, sw_batch_size=3).array
    np.testing.assert_array_equal(out, vol.array)
    path = save_nifti(tmp_path / "out.nii.gz", out, vol.affine, dtype=np.float32)
    back = load_nifti(path)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(nib.load(path).affine, vol.affine)

    # Slices were batched (<= sw_batch_size), resized in-plane, windowed, in z order.
    assert [s.shape for s in spy.seen] == [(3, 1, 32, 32), (3, 1, 32, 32), (1, 1, 32, 32)]
    ras, _ = canonical_ras(vol)
    expected = HUWindow(**WINDOW).normalise(resize_slices(ras.array, (32, 32)))
    seen = torch.cat(spy.seen)[:, 0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(seen, expected, atol=1e-6)


def test_a_constant_change_comes_back_on_every_slice() -> None:
    class Brighter(SpyIdentity):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 0.05  # +100 HU in a 2000 HU window

    vol = _lps_volume()
    vol = Volume(array=np.clip(vol.array, -900, 900), affine=vol.affine)
    out = predict_volume(_model(Brighter()), vol, {}, sw_batch_size=4).array
    np.testing.assert_allclose(out - vol.array, 100.0, atol=1e-2)


def test_per_volume_metrics_on_a_phantom_pair() -> None:
    a, b = phantom_pair(3)
    metrics = evaluate_pair(_model(SpyIdentity(), size=32), a, b, sw_batch_size=16)
    assert metrics["mae_hu"] == metrics["identity_mae_hu"] > 0
    assert np.isfinite(metrics["psnr"]) and 0 < metrics["ssim"] <= 1
    assert mean_metrics({"x": metrics, "y": metrics}) == metrics


def test_data_info_round_trips_the_resize_flag() -> None:
    info = _model(SpyIdentity()).data
    assert DataInfo.from_dict(info.as_dict()) == info
    old = {"patch_size": [16, 16, 16], "spacing": [3, 3, 3], "window": WINDOW}
    assert DataInfo.from_dict(old).resize_inplane is False
    assert "resize_inplane" not in DataInfo.from_dict(old).as_dict()
