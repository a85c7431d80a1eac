"""Axial / coronal / sagittal montages a reader can judge, for TensorBoard and the run report.

Models see a wide HU window mapped to [0, 1] (``DataInfo.window``, -1000..1000 HU by default),
where soft tissue and contrast enhancement span a few grey levels. A montage maps the volumes
back to HU and shows them at a clinical display window (soft tissue W400 L40 unless asked
otherwise), upsampled to a readable size with the voxel spacing's aspect, in radiological
orientation (patient's right on the image's left, anterior up; anterior left in sagittal), with
every row and column labelled: input, output, target and |output - target|.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ctray.registry import DataInfo

ROWS = ("input", "output", "target", "|output - target|")
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
# Layout in pixels: row labels on the left, plane names on top, the window in a footer.
LABEL_WIDTH, HEADER_HEIGHT, GAP, FOOTER_HEIGHT = 150, 28, 4, 26


@dataclass(frozen=True, kw_only=True)
class DisplayWindow:
    """A display window in HU: ``level`` is its centre, ``width`` its extent."""

    name: str
    level: float
    width: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ValueError(f"display window {self.name!r}: width must be > 0, got {self.width}")

    @property
    def lo(self) -> float:
        return self.level - self.width / 2

    @property
    def hi(self) -> float:
        return self.level + self.width / 2

    def label(self) -> str:
        return f"{self.name} W{self.width:g} L{self.level:g}"


# Common CT display presets (level, width in HU).
DISPLAY_WINDOWS = {
    "soft_tissue": DisplayWindow(name="soft tissue", level=40.0, width=400.0),
    "lung": DisplayWindow(name="lung", level=-600.0, width=1500.0),
    "bone": DisplayWindow(name="bone", level=400.0, width=1800.0),
}


def display_window(spec: str | DisplayWindow) -> DisplayWindow:
    """A named window (``soft_tissue``, ``lung``, ``bone``) or ``LEVEL/WIDTH`` in HU (40/400)."""
    if isinstance(spec, DisplayWindow):
        return spec
    if spec in DISPLAY_WINDOWS:
        return DISPLAY_WINDOWS[spec]
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*", spec)
    if not match:
        raise ValueError(
            f"display window {spec!r}: give one of {', '.join(DISPLAY_WINDOWS)} or "
            "LEVEL/WIDTH in HU, e.g. 40/400"
        )
    return DisplayWindow(name="custom", level=float(match[1]), width=float(match[2]))


def to_hu(volume: np.ndarray, window: dict[str, float]) -> np.ndarray:
    """Normalised [0, 1] intensities back to HU through the data's window."""
    lo, hi = float(window["lo"]), float(window["hi"])
    return lo + np.clip(volume, 0.0, 1.0) * (hi - lo)


def _planes(vol: np.ndarray) -> dict[str, np.ndarray]:
    """Mid-slices of a canonical RAS (X, Y, Z) volume, rows top to bottom, columns left to right:
    axial (anterior up, patient's right left), coronal (superior up, right left), sagittal
    (superior up, anterior left). Planes one voxel thin (a 2D model's slice) are left out."""
    x, y, z = (s // 2 for s in vol.shape)
    planes = {
        "axial": vol[::-1, ::-1, z].T,
        "coronal": vol[::-1, y, ::-1].T,
        "sagittal": vol[x, ::-1, ::-1].T,
    }
    return {k: p for k, p in planes.items() if min(p.shape) > 1}


# Physical (row, column) spacing of each plane, as indices into the volume's spacing.
_PLANE_AXES = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}
_PLANE_SIDES = {"axial": "R | L", "coronal": "R | L", "sagittal": "A | P"}


def panel_origin(row: int, column: int, panel: int) -> tuple[int, int]:
    """Top-left (x, y) pixel of the ``panel`` x ``panel`` square at ``row``, ``column``."""
    return LABEL_WIDTH + column * (panel + GAP), HEADER_HEIGHT + row * (panel + GAP)


@cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _gray(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = np.clip((image - lo) / (hi - lo), 0.0, 1.0) * 255
    return np.ascontiguousarray(scaled.round().astype(np.uint8))


def _fit(plane: np.ndarray, spacing: Sequence[float], panel: int) -> Image.Image:
    """Nearest-neighbour upsampling to fit a ``panel`` square with the physical aspect."""
    height_mm, width_mm = plane.shape[0] * spacing[0], plane.shape[1] * spacing[1]
    scale = panel / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    return Image.fromarray(plane).resize(size, Image.Resampling.NEAREST)


def montage(
    input: torch.Tensor,
    output: torch.Tensor,
    target: torch.Tensor,
    *,
    data: DataInfo,
    display: str | DisplayWindow = "soft_tissue",
    panel: int = 256,
) -> np.ndarray:
    """An (H, W, 3) uint8 image: rows input / output / target / |output - target|, columns the
    planes through the volumes' centre, each ``panel`` x ``panel`` pixels, labelled.

    Args:
        input / output / target: (X, Y, Z) volumes in [0, 1] on the model's output grid
            (``data.output_scale`` times the data's voxels), as ``Stage.preview`` returns them.
        data: the data's HU window (to map back to HU) and voxel spacing (for the aspect).
        display: display window name or ``LEVEL/WIDTH``; the difference row spans 0 to half
            its width.
    """
    window = display_window(display)
    volumes = [
        to_hu(v.detach().float().cpu().numpy(), data.window) for v in (input, output, target)
    ]
    shapes = {v.shape for v in volumes}
    if len(shapes) != 1 or len(volumes[0].shape) != 3:
        raise ValueError(f"montage needs three 3D volumes of one shape, got {sorted(shapes)}")
    volumes.append(np.abs(volumes[1] - volumes[2]))
    spacing = [s / k for s, k in zip(data.spacing, data.output_scale, strict=True)]
    diff_hi = window.width / 2
    ranges = [(window.lo, window.hi)] * 3 + [(0.0, diff_hi)]
    grid = [_planes(v) for v in volumes]
    columns = list(grid[0])
    if not columns:
        raise ValueError(f"montage: volumes of shape {volumes[0].shape} have no 2D plane")
    font, small = _font(16), _font(13)
    caption = (
        f"{window.label()} HU; |output - target| 0..{diff_hi:g} HU; "
        f"voxels {'x'.join(f'{s:g}' for s in spacing)} mm"
    )
    width, bottom = panel_origin(len(ROWS), len(columns), panel)
    width = max(width, 16 + round(small.getlength(caption)))  # a single column is narrow
    canvas = Image.new("RGB", (width, bottom + FOOTER_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        x0, _ = panel_origin(0, c, panel)
        draw.text((x0 + 4, 6), f"{name}  ({_PLANE_SIDES[name]})", fill=TEXT, font=font)
    for r, (label, planes, (lo, hi)) in enumerate(zip(ROWS, grid, ranges, strict=True)):
        _, y0 = panel_origin(r, 0, panel)
        draw.text((8, y0 + panel // 2 - 10), label, fill=TEXT, font=font)
        for c, name in enumerate(columns):
            image = _fit(
                _gray(planes[name], lo, hi), [spacing[a] for a in _PLANE_AXES[name]], panel
            )
            x0, y0 = panel_origin(r, c, panel)
            offset = (x0 + (panel - image.width) // 2, y0 + (panel - image.height) // 2)
            canvas.paste(image.convert("RGB"), offset)
    draw.text((8, bottom + 5), caption, fill=TEXT, font=small)
    return np.asarray(canvas)
