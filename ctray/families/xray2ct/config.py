"""Configuration of the xray2ct family (seed 003), with its presets.

The X-ray geometry (:class:`ViewSettings`) is shared by the data build, which renders the
views, and the model, which back-projects its features along the same rays and re-projects its
output for the projection-consistency loss. A model trains on shards whose geometry it
matches (the steps check every batch) and on a subset of the rendered view angles: shards
rendered at 0, 45, 90 and 135 deg serve 2-view (0, 90) and 4-view models alike, so the number
of views is a model option that Tune can search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ctray.data.drr import DRRGeometry, fit_pixel_mm

Beam = Literal["parallel", "cone"]
DEFAULT_ANGLES: tuple[float, ...] = (0.0, 90.0)


@dataclass(frozen=True, kw_only=True)
class ViewSettings:
    """X-ray geometry around the output grid (a box centred on the isocentre).

    Attributes:
        beam: ``cone`` (point source, flat detector) or ``parallel``.
        sid_mm / sdd_mm: source-isocentre and source-detector distances (cone beam); 1000 /
            1500 mm is a typical radiography set-up.
        detector_px: square detector side in pixels (None: the output grid's largest side).
        pixel_mm: detector pixel spacing (None: the smallest spacing at which the detector
            sees the whole output box from any gantry angle).
    """

    beam: Beam = "cone"
    sid_mm: float = 1000.0
    sdd_mm: float = 1500.0
    detector_px: int | None = None
    pixel_mm: float | None = None

    def geometry(
        self, angles: Sequence[float], patch_size: Sequence[int], spacing: Sequence[float]
    ) -> DRRGeometry:
        """The DRR geometry of ``angles`` around an output grid of ``patch_size`` x ``spacing``."""
        px = self.detector_px or max(int(p) for p in patch_size)
        extent = [float(n) * float(s) for n, s in zip(patch_size, spacing, strict=True)]
        pixel = self.pixel_mm or fit_pixel_mm(
            beam=self.beam,
            detector=(px, px),
            extent_mm=extent,
            sid_mm=self.sid_mm,
            sdd_mm=self.sdd_mm,
        )
        return DRRGeometry(
            beam=self.beam,
            angles=tuple(float(a) for a in angles),
            detector=(px, px),
            pixel_mm=(pixel, pixel),
            sid_mm=self.sid_mm,
            sdd_mm=self.sdd_mm,
        )


@dataclass(frozen=True, kw_only=True)
class XRay2CTConfig(ViewSettings):
    """Views, network, loss weights and schedule.

    Attributes:
        num_views: views evenly spaced over 180 deg (2: AP + lateral; 4: 0/45/90/135).
        view_angles: explicit gantry angles in degrees (overrides ``num_views``, which must
            then agree if given). Neither: AP + lateral.
        width: channels of the finest level; level ``s`` has ``width * 2**s`` (at most 8x).
        levels: scales of the 2D encoder and of the 3D decoder (the output grid is halved
            ``levels - 1`` times; the coarsest grid must keep >= 2 voxels per axis).
        attn_layers: cross-view transformer blocks at the coarsest 2D scale (self-attention
            within a view, then cross-attention to every other view, then an MLP).
        head_dim: channels per attention head (cross-view attention and Swin).
        swin_levels: coarsest decoder levels refined by a Swin transformer stage.
        swin_depth: Swin blocks per stage (alternating plain and shifted windows).
        window: Swin window side in voxels.
        mlp_ratio: MLP width of the transformer blocks over their width.
        residual_on_mean: predict a correction to the mean training volume (a buffer filled
            while training); the model then starts as the ``mean`` baseline.
        w_l1 / w_ssim / w_edge / w_fft / w_deep / w_projection: loss weights (the seed's L1 1,
            SSIM 0.3, 3D Sobel edges 0.2, FFT magnitude 0.3, deep supervision 0.2; plus
            projection consistency: DRRs of the output against the input views). The seed's
            VGG perceptual term is left out: no pretrained weights can be fetched here.
        ssim_window: SSIM Gaussian window (odd; at most the output's smallest side).
        projection_step_mm: ray step of the projection-consistency DRRs (None: one voxel).
        lr / weight_decay: AdamW (the seed: 1e-4 / 1e-4).
        warmup_steps: linear warm-up, then cosine decay over the epochs to ``min_lr_ratio``.
    """

    num_views: int | None = None
    view_angles: tuple[float, ...] | None = None
    width: int = 16
    levels: int = 4
    attn_layers: int = 1
    head_dim: int = 16
    swin_levels: int = 2
    swin_depth: int = 2
    window: int = 4
    mlp_ratio: float = 2.0
    residual_on_mean: bool = True
    w_l1: float = 1.0
    w_ssim: float = 0.3
    w_edge: float = 0.2
    w_fft: float = 0.3
    w_deep: float = 0.2
    w_projection: float = 0.5
    ssim_window: int = 7
    projection_step_mm: float | None = None
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01

    def __post_init__(self) -> None:
        if self.num_views is not None and self.num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {self.num_views}")
        if self.view_angles is not None:
            if not self.view_angles:
                raise ValueError("view_angles must list at least one angle")
            if len({round(a % 360.0, 6) for a in self.view_angles}) != len(self.view_angles):
                raise ValueError(f"view_angles repeat an angle: {self.view_angles}")
            if self.num_views is not None and self.num_views != len(self.view_angles):
                raise ValueError(
                    f"num_views={self.num_views} disagrees with view_angles {self.view_angles}; "
                    "set one of them"
                )
        if self.levels < 2:
            raise ValueError(f"levels must be >= 2, got {self.levels}")
        if not 0 <= self.swin_levels <= self.levels:
            raise ValueError(f"swin_levels must be in [0, levels={self.levels}]")
        if self.width < 1 or self.head_dim < 1 or self.window < 1 or self.swin_depth < 1:
            raise ValueError("width, head_dim, window and swin_depth must be >= 1")
        if self.ssim_window < 3 or self.ssim_window % 2 == 0:
            raise ValueError(f"ssim_window must be odd and >= 3, got {self.ssim_window}")
        weights = (self.w_l1, self.w_ssim, self.w_edge, self.w_fft, self.w_deep, self.w_projection)
        if min(weights) < 0:
            raise ValueError("loss weights must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @property
    def angles(self) -> tuple[float, ...]:
        """The model's view angles in degrees, in input order."""
        if self.view_angles is not None:
            return tuple(float(a) for a in self.view_angles)
        if self.num_views is not None:
            return tuple(k * 180.0 / self.num_views for k in range(self.num_views))
        return DEFAULT_ANGLES

    def channels(self, level: int) -> int:
        return self.width * min(2**level, 8)

    def model_geometry(self, patch_size: Sequence[int], spacing: Sequence[float]) -> DRRGeometry:
        return self.geometry(self.angles, patch_size, spacing)


PRESETS: dict[str, dict[str, object]] = {
    # Seconds on a CPU (tests, smoke runs: 16^3 outputs).
    "debug": {
        "width": 4,
        "levels": 3,
        "head_dim": 4,
        "swin_levels": 1,
        "window": 2,
        "warmup_steps": 2,
        "lr": 1e-3,
    },
    # The CPU demo: 32^3 outputs from 32^2 views, ~0.4 M parameters.
    "demo": {
        "width": 8,
        "levels": 4,
        "head_dim": 8,
        "swin_levels": 2,
        "window": 4,
        "warmup_steps": 10,
        "lr": 1e-3,
    },
    # One A100 per trial: 128^3 outputs from 128^2 views (X2CT-GAN's sizes), bf16.
    "a100": {
        "width": 32,
        "levels": 5,
        "attn_layers": 2,
        "head_dim": 32,
        "swin_levels": 3,
        "swin_depth": 2,
        "window": 4,
        "mlp_ratio": 4.0,
        "lr": 2e-4,
        "warmup_steps": 500,
    },
}
