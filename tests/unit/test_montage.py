"""Montages: readable size with the voxel aspect, labels, the display window, orientation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctray.registry import DataInfo
from ctray.train.montage import (
    BACKGROUND,
    FOOTER_HEIGHT,
    HEADER_HEIGHT,
    LABEL_WIDTH,
    ROWS,
    display_window,
    montage,
    panel_origin,
)

PANEL = 256
DATA = DataInfo(patch_size=(16, 16, 16), spacing=(8.0, 8.0, 8.0), window={"lo": -1000, "hi": 1000})


def _norm(hu: np.ndarray | float, window=DATA.window) -> torch.Tensor:
    """HU to the data's [0, 1] intensities."""
    lo, hi = window["lo"], window["hi"]
    return torch.as_tensor((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo))


def _panel(image: np.ndarray, row: int, column: int) -> np.ndarray:
    x0, y0 = panel_origin(row, column, PANEL)
    return image[y0 : y0 + PANEL, x0 : x0 + PANEL]


def _content(panel: np.ndarray) -> tuple[int, int]:
    """Height and width of what was pasted into a panel (pixels that are not background)."""
    mask = np.any(panel != np.array(BACKGROUND, dtype=np.uint8), axis=-1)
    rows, cols = np.nonzero(mask)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def _vol(hu: float, shape=(16, 16, 16)) -> torch.Tensor:
    return _norm(np.full(shape, hu))


def test_four_labelled_rows_three_planes_each_panel_at_least_256_px():
    image = montage(_vol(40), _vol(40), _vol(40), data=DATA)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert image.shape[:2] == (
        HEADER_HEIGHT + 4 * (PANEL + 4) + FOOTER_HEIGHT,
        LABEL_WIDTH + 3 * 260,
    )
    for column in range(3):
        assert _content(_panel(image, 0, column)) == (PANEL, PANEL)  # 16 voxels -> 256 px
    # Text (light pixels) in each row's label strip, above each column and in the footer.
    light = image.min(axis=-1) > 150
    for row in range(len(ROWS)):
        _, y0 = panel_origin(row, 0, PANEL)
        assert light[y0 : y0 + PANEL, :LABEL_WIDTH].sum() > 30, f"no label for row {row}"
    for column in range(3):
        x0, _ = panel_origin(0, column, PANEL)
        assert light[:HEADER_HEIGHT, x0 : x0 + PANEL].sum() > 30, f"no name for column {column}"
    assert light[-FOOTER_HEIGHT:].sum() > 100, "no window caption"


def test_soft_tissue_window_separates_what_the_training_window_hides():
    # Liver-like 60 HU beside 30 HU: 3 grey levels apart in -1000..1000, about 19 in W400 L40.
    hu = np.full((16, 16, 16), 30.0)
    hu[8:] = 60.0
    image = montage(_norm(hu), _norm(hu), _norm(hu), data=DATA)
    axial = _panel(image, 0, 0)[..., 0].astype(int)
    levels = sorted({int(v) for v in np.unique(axial)})
    assert levels == [round((30 + 160) / 400 * 255), round((60 + 160) / 400 * 255)]
    wide = montage(_norm(hu), _norm(hu), _norm(hu), data=DATA, display="0/2000")
    wide_levels = np.unique(_panel(wide, 0, 0)[..., 0])
    assert np.ptp(wide_levels.astype(int)) < 5  # the training-window view hides it
    lung = montage(_vol(-600), _vol(-600), _vol(-600), data=DATA, display="lung")
    assert np.all(_panel(lung, 0, 0)[..., 0] == 128)  # the lung window's level is mid-grey


def test_difference_row_is_absolute_hu_error_over_half_the_window_width():
    image = montage(_vol(40), _vol(140), _vol(40), data=DATA)  # |output - target| = 100 HU
    assert np.all(_panel(image, 3, 0)[..., 0] == round(100 / 200 * 255))
    same = montage(_vol(40), _vol(40), _vol(40), data=DATA)
    assert np.all(_panel(same, 3, 0)[..., 0] == 0)


def test_radiological_orientation():
    """RAS arrays: high x is the patient's right, shown on the image's left; anterior (high y)
    up in axial; superior (high z) up in coronal; anterior left in sagittal."""
    hu = np.full((16, 16, 16), -100.0)
    hu[12:, :, :] = 200.0  # patient's right
    image = montage(_norm(hu), _norm(hu), _norm(hu), data=DATA)
    axial = _panel(image, 0, 0)[..., 0]
    assert axial[:, :64].mean() > 200 and axial[:, -64:].mean() < 50
    hu = np.full((16, 16, 16), -100.0)
    hu[:, 12:, :] = 200.0  # anterior
    image = montage(_norm(hu), _norm(hu), _norm(hu), data=DATA)
    axial, sagittal = _panel(image, 0, 0)[..., 0], _panel(image, 0, 2)[..., 0]
    assert axial[:64].mean() > 200 and axial[-64:].mean() < 50
    assert sagittal[:, :64].mean() > 200 and sagittal[:, -64:].mean() < 50
    hu = np.full((16, 16, 16), -100.0)
    hu[:, :, 12:] = 200.0  # superior
    image = montage(_norm(hu), _norm(hu), _norm(hu), data=DATA)
    for column in (1, 2):  # coronal, sagittal
        plane = _panel(image, 0, column)[..., 0]
        assert plane[:64].mean() > 200 and plane[-64:].mean() < 50


def test_thick_slices_keep_their_physical_aspect():
    data = DataInfo(patch_size=(16, 16, 4), spacing=(1.0, 1.0, 5.0), window=DATA.window)
    image = montage(*(_vol(40, (16, 16, 4)) for _ in range(3)), data=data)
    assert _content(_panel(image, 0, 0)) == (PANEL, PANEL)  # axial: 16 x 16 mm
    assert _content(_panel(image, 0, 1)) == (PANEL, round(16 / 20 * PANEL))  # 20 mm tall


def test_output_grid_spacing_is_the_data_spacing_over_output_scale():
    data = DataInfo(
        patch_size=(16, 16, 4), spacing=(1.0, 1.0, 5.0), window=DATA.window, output_scale=(1, 1, 5)
    )
    image = montage(*(_vol(40, (16, 16, 20)) for _ in range(3)), data=data)
    assert _content(_panel(image, 0, 1)) == (PANEL, round(16 / 20 * PANEL))  # 1 mm voxels


def test_a_single_slice_shows_only_the_axial_plane():
    image = montage(*(_vol(40, (16, 16, 1)) for _ in range(3)), data=DATA)
    assert _content(_panel(image, 0, 0)) == (PANEL, PANEL)
    beside = image[HEADER_HEIGHT:-FOOTER_HEIGHT, LABEL_WIDTH + PANEL + 4 :]
    assert np.all(beside == np.array(BACKGROUND, dtype=np.uint8)), "no coronal or sagittal"
    caption = image[-FOOTER_HEIGHT:].min(axis=-1) > 150
    assert not caption[:, -8:].any(), "the caption must fit the one-column image"
    assert caption[:, LABEL_WIDTH + PANEL :].any()


def test_mismatched_volumes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        montage(_vol(0), _vol(0, (8, 8, 8)), _vol(0), data=DATA)


def test_display_windows_by_name_or_level_width():
    assert (display_window("soft_tissue").level, display_window("soft_tissue").width) == (40, 400)
    assert (display_window("lung").lo, display_window("lung").hi) == (-1350, 150)
    custom = display_window("-50/350")
    assert (custom.level, custom.width) == (-50, 350)
    for bad in ("liver", "40", "40/0", "40/-5"):
        with pytest.raises(ValueError, match="display window"):
            display_window(bad)
