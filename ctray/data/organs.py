"""Organ classes for contrast simulation, as TotalSegmentator v2 `total` label ids.

One label convention everywhere (phantom, simulator, real scans segmented with TotalSegmentator)
so a real label map can replace the phantom without any remapping.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ENHANCING_ORGANS", "ORGANS", "TS_LABELS", "organ_mask"]

# TotalSegmentator v2 `total` ids used by the project (name -> id).
TS_LABELS: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
    "small_bowel": 18,
    "duodenum": 19,
    "colon": 20,
    "vertebrae_L5": 27,
    "vertebrae_L4": 28,
    "vertebrae_L3": 29,
    "vertebrae_L2": 30,
    "vertebrae_L1": 31,
    "vertebrae_T12": 32,
    "vertebrae_T11": 33,
    "aorta": 52,
    "inferior_vena_cava": 63,
    "portal_vein_and_splenic_vein": 64,
    "iliac_artery_left": 65,
    "iliac_artery_right": 66,
    "iliac_vena_left": 67,
    "iliac_vena_right": 68,
    "spinal_cord": 79,
    "autochthon_left": 86,
    "autochthon_right": 87,
    "iliopsoas_left": 88,
    "iliopsoas_right": 89,
}

_T = TS_LABELS
# Classes whose attenuation changes with contrast phase (keys of phases.ENHANCEMENT_HU).
ENHANCING_ORGANS: tuple[str, ...] = (
    "aorta",
    "portal_vein",
    "ivc",
    "liver",
    "spleen",
    "kidney",
    "pancreas",
)

ORGANS: dict[str, tuple[int, ...]] = {
    "aorta": (_T["aorta"], _T["iliac_artery_left"], _T["iliac_artery_right"]),
    "portal_vein": (_T["portal_vein_and_splenic_vein"],),
    "ivc": (_T["inferior_vena_cava"], _T["iliac_vena_left"], _T["iliac_vena_right"]),
    "liver": (_T["liver"],),
    "spleen": (_T["spleen"],),
    "kidney": (_T["kidney_right"], _T["kidney_left"]),
    "pancreas": (_T["pancreas"],),
    # Non-enhancing classes the phantom draws (left unchanged by the phase simulator).
    "gallbladder": (_T["gallbladder"],),
    "bowel": (_T["colon"], _T["small_bowel"]),
    "spine": tuple(range(_T["vertebrae_L5"], _T["vertebrae_T11"] + 1)),
    "spinal_cord": (_T["spinal_cord"],),
    "muscle": (
        _T["autochthon_left"],
        _T["autochthon_right"],
        _T["iliopsoas_left"],
        _T["iliopsoas_right"],
    ),
}


def organ_mask(labels: np.ndarray, organ: str) -> np.ndarray:
    """Boolean mask of all label ids belonging to `organ` (a key of ORGANS).

    Raises:
        ValueError: for an unknown organ name, listing the valid ones.
    """
    try:
        ids = ORGANS[organ]
    except KeyError:
        valid = ", ".join(ORGANS)
        raise ValueError(f"unknown organ {organ!r}; valid: {valid}") from None
    return np.isin(labels, ids)
