"""Thick-slice CT with known truth, and the z-interpolation baselines every model must beat.

A scanner reconstructs a thick slice as the weighted mean of the tissue inside its slice
profile, so the simulator starts from a thin volume (the phantom or a real thin scan), averages
each slab of ``factor`` thin slices through a slice profile of the thick spacing, keeps one value
per slab and adds reconstruction noise; the thin volume is kept as the truth.

Geometry (the same everywhere in ctray): thick slice ``k`` covers thin slices
``k*f .. k*f + f - 1`` and sits at the slab's centre, thin index ``k*f + (f - 1) / 2``. That is
``align_corners=False`` in torch terms, so the baselines are ``F.interpolate`` along z only.

Slice profiles:
    box: the plain mean of the slab's ``f`` thin slices (an ideal rectangular profile as wide
        as the thick spacing; the default).
    gaussian: a Gaussian whose FWHM is the thick spacing, centred on the slab and reaching into
        the neighbouring slabs (closer to a real scanner's profile; edges repeat at the ends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ctray.data.nifti import Volume

__all__ = [
    "Profile",
    "ThickSliceConfig",
    "cubic_z",
    "linear_z",
    "profile_weights",
    "simulate_thick",
    "thick_affine",
    "thick_from_thin",
    "thin_affine",
    "upsample_z",
]

Profile = Literal["box", "gaussian"]
PROFILES: tuple[str, ...] = ("box", "gaussian")
_A = TypeVar("_A", np.ndarray, torch.Tensor)


@dataclass(frozen=True, kw_only=True)
class ThickSliceConfig:
    """How the thick scan is made from the thin one.

    Attributes:
        factor: thin slices per thick slice (5 mm -> 1 mm is 5, not the seed's "6x").
        profile: slice profile, ``box`` (default) or ``gaussian`` (FWHM = thick spacing).
        noise_sd: Gaussian noise (HU) added to every thick voxel; 0 keeps only the thin
            scan's own noise (averaged down by the profile).
    """

    factor: int = 5
    profile: Profile = "box"
    noise_sd: float = 0.0

    def __post_init__(self) -> None:
        if int(self.factor) != self.factor or self.factor < 1:
            raise ValueError(f"factor must be an integer >= 1, got {self.factor}")
        if self.profile not in PROFILES:
            raise ValueError(
                f"unknown slice profile {self.profile!r}; valid: {', '.join(PROFILES)}"
            )
        if self.noise_sd < 0:
            raise ValueError(f"noise_sd must be >= 0 HU, got {self.noise_sd}")


def profile_weights(factor: int, profile: Profile = "box") -> tuple[np.ndarray, int]:
    """The slab kernel: weights over thin offsets ``-pad .. factor - 1 + pad`` of a slab start.

    Returns (weights summing to 1, pad).
    """
    if profile == "box":
        return np.full(factor, 1.0 / factor), 0
    if profile == "gaussian":
        pad = factor
        offsets = np.arange(-pad, factor + pad, dtype=np.float64) - (factor - 1) / 2.0
        sigma = factor / (2.0 * np.sqrt(2.0 * np.log(2.0)))  # FWHM = one thick slice
        w = np.exp(-0.5 * (offsets / sigma) ** 2)
        return w / w.sum(), pad
    raise ValueError(f"unknown slice profile {profile!r}; valid: {', '.join(PROFILES)}")


def thick_from_thin(thin: _A, factor: int, profile: Profile = "box") -> _A:
    """Thick slices (..., D // factor) from thin ones (..., D) along the last axis.

    Numpy stays numpy (float32 or the input's float type), tensors stay tensors.

    Raises:
        ValueError: when D is not a multiple of ``factor`` (crop the thin volume first, as
            :func:`simulate_thick` does).
    """
    depth = thin.shape[-1]
    if depth % factor or depth == 0:
        raise ValueError(
            f"{depth} thin slices are not a whole number of {factor}-slice slabs; crop the "
            f"thin volume to a multiple of {factor} slices (simulate_thick crops the far end)"
        )
    is_numpy = isinstance(thin, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(thin)) if is_numpy else thin
    if not t.is_floating_point():
        t = t.float()
    if profile == "box":
        out = t.reshape(*t.shape[:-1], depth // factor, factor).mean(-1)
    else:
        weights, pad = profile_weights(factor, profile)
        flat = t.reshape(-1, 1, depth)
        flat = F.pad(flat, (pad, pad), mode="replicate")
        kernel = torch.as_tensor(weights, dtype=t.dtype, device=t.device).view(1, 1, -1)
        out = F.conv1d(flat, kernel, stride=factor).reshape(*t.shape[:-1], depth // factor)
    return out.numpy() if is_numpy else out


def thick_affine(thin: np.ndarray, factor: int) -> np.ndarray:
    """The thick grid of a thin grid: z spacing x ``factor``, origin at the first slab centre."""
    thin = np.asarray(thin, dtype=np.float64)
    out = thin.copy()
    out[:3, 2] = thin[:3, 2] * factor
    out[:3, 3] = thin[:3, 3] + thin[:3, 2] * (factor - 1) / 2.0
    return out


def thin_affine(thick: np.ndarray, factor: int) -> np.ndarray:
    """Inverse of :func:`thick_affine`: the thin grid whose slabs the thick slices average."""
    thick = np.asarray(thick, dtype=np.float64)
    out = thick.copy()
    out[:3, 2] = thick[:3, 2] / factor
    out[:3, 3] = thick[:3, 3] - out[:3, 2] * (factor - 1) / 2.0
    return out


def simulate_thick(
    thin: Volume,
    config: ThickSliceConfig = ThickSliceConfig(),
    *,
    rng: np.random.Generator | None = None,
) -> tuple[Volume, Volume]:
    """(thick, thin truth) from a thin volume whose third axis is z.

    The thin volume is cropped at the far end to a whole number of slabs, so the thick scan
    has exactly ``thin slices / factor`` slices and its affine places each one at its slab's
    centre.
    """
    f = config.factor
    n = thin.shape[2] // f
    if n < 1:
        raise ValueError(
            f"a thin volume of {thin.shape[2]} slices is thinner than one {f}-slice slab; "
            "use a longer scan or a smaller factor"
        )
    truth = Volume(array=np.ascontiguousarray(thin.array[:, :, : n * f]), affine=thin.affine)
    thick = thick_from_thin(truth.array.astype(np.float32, copy=False), f, config.profile)
    if config.noise_sd > 0:
        rng = rng if rng is not None else np.random.default_rng()
        thick = thick + rng.standard_normal(thick.shape, dtype=np.float32) * np.float32(
            config.noise_sd
        )
    return Volume(array=thick.astype(np.float32), affine=thick_affine(thin.affine, f)), truth


def _catmull_rom(t: np.ndarray) -> list[np.ndarray]:
    """Keys cubic weights (a = -0.5) of the neighbours -1, 0, 1, 2 at fractional offset t."""
    a = -0.5

    def kernel(s: np.ndarray) -> np.ndarray:
        s = np.abs(s)
        near = ((a + 2) * s - (a + 3)) * s * s + 1
        far = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
        return np.where(s <= 1, near, np.where(s < 2, far, 0.0))

    return [kernel(1 + t), kernel(t), kernel(1 - t), kernel(2 - t)]


def upsample_z(x: torch.Tensor, factor: int, mode: Literal["linear", "cubic"]) -> torch.Tensor:
    """(B, C, H, W, D) -> (B, C, H, W, D * factor) in float32, interpolating along z only.

    Thin slice ``i`` samples thick coordinate ``(i + 0.5) / factor - 0.5`` (slab centres,
    ``align_corners=False``); beyond the first and last slab centre the edge slice repeats
    (linear) or the clamped neighbours extrapolate (cubic).

    ``cubic`` is Keys' cubic convolution with a = -0.5 (Catmull-Rom), which reproduces
    polynomials up to degree 2. torch's ``bicubic`` uses a = -0.75, which does not even
    reproduce a linear ramp (about half a thin slice of ripple at x5), so it is not used.
    """
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, H, W, D) volumes, got shape {tuple(x.shape)}")
    x = x.float()
    d = x.shape[-1]
    if mode == "linear":
        flat = x.reshape(-1, 1, d)
        out = F.interpolate(flat, size=d * factor, mode="linear", align_corners=False)
        return out.reshape(*x.shape[:-1], d * factor)
    if mode != "cubic":
        raise ValueError(f"unknown interpolation {mode!r}; valid: linear, cubic")
    u = (np.arange(d * factor) + 0.5) / factor - 0.5
    base = np.floor(u)
    weights = _catmull_rom(u - base)
    out = None
    for k, w in enumerate(weights):
        idx = np.clip(base.astype(np.int64) + k - 1, 0, d - 1)
        term = x.index_select(-1, torch.as_tensor(idx, device=x.device))
        term = term * torch.as_tensor(w, dtype=x.dtype, device=x.device)
        out = term if out is None else out + term
    return out


def linear_z(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The linear baseline: thick (B, C, H, W, D) -> thin (B, C, H, W, D * factor)."""
    return upsample_z(x, factor, "linear")


def cubic_z(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The cubic baseline: thick (B, C, H, W, D) -> thin (B, C, H, W, D * factor)."""
    return upsample_z(x, factor, "cubic")
