"""The family contract (FamilySpec) and the explicit list of model families.

A family is data, not a subclass: the generic train loop, the tuner, the exporter and the server
only ever see a FamilySpec. Families are imported lazily by name so that `ctray --help` or the
server does not import every model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Batch = Mapping[str, torch.Tensor]
Models = dict[str, nn.Module]
Optimizers = dict[str, torch.optim.Optimizer]


@dataclass(frozen=True, kw_only=True)
class DataInfo:
    """What a model must know about the data it was trained on (read from the shard manifest)."""

    patch_size: tuple[int, ...]
    spacing: tuple[float, float, float]
    window: dict[str, float]
    # 2D slice models (patch (H, W, 1)): each axial slice is resized in-plane to (H, W) instead of
    # being resampled to ``spacing``; z keeps the input's own slices. Off for older models.
    resize_inplane: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataInfo:
        """From the ``data`` dict of a train config or model.json (optional keys may be absent)."""
        return cls(
            patch_size=tuple(int(p) for p in data["patch_size"]),
            spacing=tuple(float(s) for s in data["spacing"]),
            window=dict(data["window"]),
            resize_inplane=bool(data.get("resize_inplane", False)),
        )

    @classmethod
    def from_manifest(cls, manifest: Any) -> DataInfo:
        """From a shard manifest (``ctray.data.shards.Manifest``)."""
        return cls(
            patch_size=tuple(manifest.patch_size),
            spacing=tuple(manifest.spacing),
            window=dict(manifest.window),
            resize_inplane=bool(manifest.build.get("resize_inplane", False)),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON form; ``resize_inplane`` is written only when set (older readers)."""
        out: dict[str, Any] = {
            "patch_size": list(self.patch_size),
            "spacing": list(self.spacing),
            "window": dict(self.window),
        }
        if self.resize_inplane:
            out["resize_inplane"] = True
        return out


@dataclass(kw_only=True)
class StepContext:
    """What a family's train/eval step may use; the generic loop owns everything in it."""

    models: Models
    optimizers: Optimizers
    config: Any
    data: DataInfo
    epoch: int
    num_epochs: int
    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]]


@dataclass(frozen=True, kw_only=True)
class Condition:
    """A conditioning input a user types at predict time (e.g. ``target_phase=venous``)."""

    parse: Callable[[str], Any]
    default: str | None
    help: str


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """Everything ctray needs to train, tune, export and serve one model family.

    Attributes:
        build_models: (config, data) -> named modules; GAN parts are just more names.
        build_optimizers: (config, models) -> named optimisers.
        train_step: one optimisation step on a batch; returns scalar losses for logging.
        eval_step: per-sample validation metrics, each a tensor of shape (B,); NaN = not
            applicable for that sample (e.g. an organ absent from the patch).
        predict: (models, x, config, conditioning) -> y on normalised patches (B, 1, *patch).
        preview: (models, batch, config) -> (input, output, target) 3D tensors for montages.
        build_shards: the family's data builder behind ``ctray data build``.
        metric/mode: what Tune optimises; reported as ``val/<metric>``.
        inference_models: the modules an exported model needs at predict time.
    """

    name: str
    description: str
    config_cls: type
    build_models: Callable[[Any, DataInfo], Models]
    build_optimizers: Callable[[Any, Models], Optimizers]
    train_step: Callable[[StepContext, Batch], dict[str, float]]
    eval_step: Callable[[StepContext, Batch], dict[str, torch.Tensor]]
    predict: Callable[[Models, torch.Tensor, Any, Mapping[str, Any]], torch.Tensor]
    preview: Callable[[Models, Batch, Any], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    build_shards: Callable[..., Any]
    columns: tuple[str, ...]
    metric: str
    mode: str
    inference_models: tuple[str, ...]
    conditioning: Mapping[str, Condition] = field(default_factory=dict)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def preset(self, name: str) -> dict[str, Any]:
        """The overrides of a named preset; an unknown name lists the valid ones."""
        if name not in self.presets:
            raise KeyError(
                f"family {self.name!r} has no preset {name!r}; "
                f"valid presets: {', '.join(sorted(self.presets))}"
            )
        return dict(self.presets[name])

    def parse_conditioning(self, given: Mapping[str, str | None]) -> dict[str, Any]:
        """Parse user-typed conditioning; unknown keys or values raise ValueError."""
        unknown = sorted(k for k in given if k not in self.conditioning)
        if unknown:
            valid = ", ".join(sorted(self.conditioning)) or "none"
            raise ValueError(
                f"unknown conditioning {', '.join(unknown)} for family {self.name!r}; "
                f"valid: {valid}"
            )
        parsed: dict[str, Any] = {}
        for key, cond in self.conditioning.items():
            raw = given.get(key) or cond.default
            if raw is None:
                raise ValueError(f"family {self.name!r} needs {key} ({cond.help})")
            parsed[key] = cond.parse(raw)
        return parsed


# The explicit list of families: name -> "module:attribute" of its FamilySpec.
FAMILIES: dict[str, str] = {
    "phase_gan": "ctray.families.phase_gan.spec:SPEC",
    "pix2pix": "ctray.families.pix2pix.spec:SPEC",
}


def family_names() -> list[str]:
    """Registered family names, sorted."""
    return sorted(FAMILIES)


def get_family(name: str) -> FamilySpec:
    """The FamilySpec called ``name``; an unknown name lists the registered ones."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; valid families: {', '.join(family_names())}")
    module_name, attr = FAMILIES[name].split(":")
    spec = getattr(importlib.import_module(module_name), attr)
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"{FAMILIES[name]} is not a FamilySpec")
    return spec
