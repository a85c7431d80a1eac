"""The hybrid CNN-ViT of seed 003, sized by configuration: N X-ray views -> one CT volume.

1. **2D encoder** (shared by the views): MONAI ``UnetResBlock`` levels, full resolution down
   to 1 / 2**(levels - 1), ``width * 2**s`` channels (at most 8x).
2. **Cross-view attention** at the coarsest 2D scale: MONAI ``TransformerBlock`` with
   cross-attention; each view's tokens attend to themselves, then to every other view's
   tokens (bidirectional for two views; N-way for N), with a learned 2D position embedding and
   an embedding of the view's gantry angle.
3. **Lifting**: at every scale, each view's feature map is smeared back along that view's rays
   (``ctray.data.drr.backproject``: the geometry of the DRRs, cone or parallel beam) onto the
   3D grid of that scale; the views' lifted features and three coordinate channels are fused
   by a 1x1x1 convolution. A voxel thus sees, per view, the feature of the pixel its ray hits.
4. **3D decoder**: a U-Net decoder from the coarsest grid up (MONAI ``UnetUpBlock``: transposed
   convolution, the lifted features of that scale as the skip, residual convolutions), with
   MONAI Swin stages (``swin_unetr.BasicLayer``: windowed and shifted-window attention) on the
   coarsest ``swin_levels`` levels and a 1x1x1 output head at **every** level (deep
   supervision; the full-resolution one is the prediction).

The seed's "8-level U-Net" on 64^3 cannot exist (64 halves six times to 1); here the depth is
``levels`` and the coarsest grid must keep >= 2 voxels per axis. The encoder side of the
U-Net is the 2D encoder: its features, lifted, are the decoder's skips, so no 3D encoder runs.

With ``residual_on_mean`` every head adds its correction to the mean training volume (average
pooled to its scale), a persistent buffer the train step fills with a running mean of the
training targets; it is exported with the weights and is the ``mean`` baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock, UnetResBlock, UnetUpBlock
from monai.networks.nets.swin_unetr import BasicLayer
from torch import nn

from ctray.data.drr import DRRGeometry, backproject, detector_grid

from .config import XRay2CTConfig

NORM = ("instance", {"affine": True})


def _heads(dim: int, head_dim: int) -> int:
    heads = max(1, dim // head_dim)
    while dim % heads:
        heads -= 1
    return heads


def _angle_features(angles: torch.Tensor) -> torch.Tensor:
    a = torch.deg2rad(angles)
    return torch.stack([a.cos(), a.sin(), (2 * a).cos(), (2 * a).sin()], dim=-1)


class ViewEncoder(nn.Module):
    """Shared 2D encoder: (B*V, 1, H, W) -> feature maps at ``levels`` scales."""

    def __init__(self, cfg: XRay2CTConfig) -> None:
        super().__init__()
        blocks = [UnetResBlock(2, 1, cfg.channels(0), kernel_size=3, stride=1, norm_name=NORM)]
        for s in range(1, cfg.levels):
            blocks.append(
                UnetResBlock(
                    2, cfg.channels(s - 1), cfg.channels(s), kernel_size=3, stride=2, norm_name=NORM
                )
            )
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats


class CrossViewAttention(nn.Module):
    """Transformer blocks over the views' coarsest tokens: self- then cross-view attention.

    Args:
        dim: token width.
        tokens: tokens per view (h * w of the coarsest feature map).
        layers: transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP width over ``dim``.
    """

    def __init__(self, dim: int, tokens: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 1, tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.angle = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                int(dim * mlp_ratio),
                heads,
                qkv_bias=True,
                with_cross_attention=True,
            )
            for _ in range(layers)
        )

    def forward(self, feats: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """(B, V, C, h, w) features of views at ``angles`` (V,) deg -> the same shape."""
        b, v, c, h, w = feats.shape
        tokens = feats.flatten(3).transpose(2, 3)  # (B, V, L, C)
        embed = self.angle(_angle_features(angles.to(feats.dtype)))
        tokens = tokens + self.pos + embed[None, :, None, :]
        others = [[u for u in range(v) if u != k] or [k] for k in range(v)]  # one view: itself
        index = torch.tensor(others, device=feats.device)  # (V, V-1)
        for block in self.blocks:
            context = tokens[:, index].reshape(b * v, -1, c)  # every other view's tokens
            tokens = block(tokens.reshape(b * v, h * w, c), context=context).reshape(b, v, -1, c)
        return tokens.transpose(2, 3).reshape(b, v, c, h, w)


class XRay2CT(nn.Module):
    """Views (B, V, H, W), normalised like the training views -> volumes at every scale.

    ``forward`` returns ``[full, 1/2, 1/4, ...]`` (``levels`` tensors (B, 1, X/2**s, ...));
    the first is the prediction in the HU window's [0, 1] (unclamped), the rest are the deep
    supervision outputs.

    Args:
        cfg: the family config.
        patch_size: the output grid (X, Y, Z); every axis divisible by 2**(levels - 1).
        spacing: its voxel size in mm.
    """

    def __init__(
        self,
        cfg: XRay2CTConfig,
        patch_size: tuple[int, int, int],
        spacing: tuple[float, float, float],
    ) -> None:
        super().__init__()
        factor = 2 ** (cfg.levels - 1)
        if len(patch_size) != 3 or any(n % factor or n // factor < 2 for n in patch_size):
            raise ValueError(
                f"xray2ct with levels={cfg.levels} needs an output grid whose axes are multiples "
                f"of {factor} with >= 2 voxels left at the coarsest level, got {patch_size}; "
                "lower `levels` or change the patch size"
            )
        self.geometry: DRRGeometry = cfg.model_geometry(patch_size, spacing)
        det = self.geometry.detector
        if det[0] % factor or det[1] % factor:
            raise ValueError(
                f"detector {det} px is not a multiple of {factor} (levels={cfg.levels}); "
                "set detector_px or lower `levels`"
            )
        self.cfg = cfg
        self.patch_size = tuple(int(n) for n in patch_size)
        self.spacing = tuple(float(s) for s in spacing)
        self.levels = cfg.levels
        self.views = self.geometry.views
        self.register_buffer("angles", torch.tensor(self.geometry.angles), persistent=False)
        self.encoder = ViewEncoder(cfg)
        coarse = cfg.channels(cfg.levels - 1)
        tokens = (det[0] // factor) * (det[1] // factor)
        self.attention = (
            CrossViewAttention(
                coarse, tokens, cfg.attn_layers, _heads(coarse, cfg.head_dim), cfg.mlp_ratio
            )
            if cfg.attn_layers > 0
            else None
        )
        self.fuse = nn.ModuleList(
            nn.Conv3d(self.views * cfg.channels(s) + 3, cfg.channels(s), kernel_size=1)
            for s in range(cfg.levels)
        )
        self.up = nn.ModuleList(
            UnetUpBlock(
                3,
                cfg.channels(s + 1),
                cfg.channels(s),
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name=NORM,
            )
            for s in range(cfg.levels - 1)
        )
        self.swin = nn.ModuleDict(
            {
                str(s): BasicLayer(
                    dim=cfg.channels(s),
                    depth=cfg.swin_depth,
                    num_heads=_heads(cfg.channels(s), cfg.head_dim),
                    window_size=(cfg.window,) * 3,
                    drop_path=[0.0] * cfg.swin_depth,
                    mlp_ratio=cfg.mlp_ratio,
                    qkv_bias=True,
                )
                for s in range(cfg.levels - cfg.swin_levels, cfg.levels)
            }
        )
        self.heads = nn.ModuleList(
            nn.Conv3d(cfg.channels(s), 1, kernel_size=1) for s in range(cfg.levels)
        )
        self.residual_on_mean = cfg.residual_on_mean
        if self.residual_on_mean:  # start exactly at the mean volume
            for head in self.heads:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        self.register_buffer("mean_ct", torch.zeros(1, 1, *self.patch_size))
        self.register_buffer("mean_count", torch.zeros(1, dtype=torch.float64))
        self._grids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def shape_at(self, level: int) -> tuple[int, int, int]:
        f = 2**level
        return tuple(n // f for n in self.patch_size)

    def _grid(self, level: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Detector coordinates of the level's voxels and its coordinate channels (cached)."""
        key = (level, str(device))
        if key not in self._grids:
            shape = self.shape_at(level)
            spacing = tuple(s * 2**level for s in self.spacing)
            grid = detector_grid(self.geometry, shape, spacing).to(device)
            axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in shape]
            coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]  # (1, 3, X, Y, Z)
            self._grids[key] = (grid, coords)
        return self._grids[key]

    def check_views(self, views: torch.Tensor) -> None:
        want = (self.views, *self.geometry.detector)
        if views.ndim != 4 or tuple(views.shape[1:]) != want:
            raise ValueError(
                f"expected views (B, {want[0]}, {want[1]}, {want[2]}) "
                f"(angles {list(self.geometry.angles)} deg), got {tuple(views.shape)}"
            )

    @torch.no_grad()
    def update_mean(self, ct: torch.Tensor) -> None:
        """Fold a batch of targets (B, 1, X, Y, Z) into the running mean training volume."""
        n = ct.shape[0]
        total = float(self.mean_count.item()) + n
        weight = n / total
        batch_mean = ct.detach().float().mean(0, keepdim=True)
        self.mean_ct.add_((batch_mean - self.mean_ct) * weight)
        self.mean_count.fill_(total)

    def mean_at(self, level: int) -> torch.Tensor:
        return F.avg_pool3d(self.mean_ct, 2**level) if level else self.mean_ct

    def lift(self, feats: torch.Tensor, level: int) -> torch.Tensor:
        """(B, V, C, h, w) view features -> (B, V*C + 3, X, Y, Z) on the level's grid."""
        grid, coords = self._grid(level, feats.device)
        shape = self.shape_at(level)
        lifted = backproject(feats, grid, shape)  # (B, V, C, X, Y, Z)
        b = lifted.shape[0]
        lifted = lifted.reshape(b, -1, *shape)
        return torch.cat((lifted, coords.to(lifted.dtype).expand(b, -1, -1, -1, -1)), dim=1)

    def backprojection(self, views: torch.Tensor) -> torch.Tensor:
        """Unfiltered back-projection (B, 1, X, Y, Z): the mean over views of their smears."""
        grid, _ = self._grid(0, views.device)
        return backproject(views[:, :, None].float(), grid, self.patch_size).mean(1)

    def forward(self, views: torch.Tensor) -> list[torch.Tensor]:
        self.check_views(views)
        b, v, h, w = views.shape
        feats = self.encoder(views.reshape(b * v, 1, h, w))
        feats = [f.reshape(b, v, *f.shape[1:]) for f in feats]
        if self.attention is not None:
            feats[-1] = self.attention(feats[-1], self.angles)
        skips = [
            self.fuse[s](self.lift(f, s)) for s, f in enumerate(feats)
        ]  # (B, C_s, X_s, Y_s, Z_s)
        outputs: list[torch.Tensor] = [None] * self.levels  # type: ignore[list-item]
        x = skips[-1]
        for s in range(self.levels - 1, -1, -1):
            if s < self.levels - 1:
                x = self.up[s](x, skips[s])
            if str(s) in self.swin:
                x = self.swin[str(s)](x)
            out = self.heads[s](x)
            if self.residual_on_mean:
                out = out + self.mean_at(s).to(out.dtype)
            outputs[s] = out
        return outputs


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
