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
    """What a model must know about the data it was trained on (read from the shard manifest).

    Attributes:
        patch_size: the model's input patch, in voxels.
        spacing: the voxel size (mm) the input is resampled to.
        window: the HU window mapped to [0, 1].
        resize_inplane: 2D slice models (patch (H, W, 1)): each axial slice is resized in-plane
            to (H, W) instead of being resampled to ``spacing``; z keeps the input's slices.
        output_scale: the output grid rule. The output has ``output_scale[i]`` times as many
            voxels along axis i at ``spacing[i] / output_scale[i]``, covering the same world
            extent (1, 1, 1: the input's own grid; (1, 1, 5): five thin slices per thick one).
    """

    patch_size: tuple[int, ...]
    spacing: tuple[float, float, float]
    window: dict[str, float]
    resize_inplane: bool = False
    output_scale: tuple[int, int, int] = (1, 1, 1)

    def __post_init__(self) -> None:
        if len(self.output_scale) != 3 or any(int(s) < 1 for s in self.output_scale):
            raise ValueError(f"output_scale must be 3 integers >= 1, got {self.output_scale}")

    @property
    def same_grid(self) -> bool:
        return tuple(self.output_scale) == (1, 1, 1)

    @property
    def output_patch(self) -> tuple[int, ...]:
        """The model's output patch size (patch_size scaled by output_scale)."""
        return tuple(p * s for p, s in zip(self.patch_size, self.output_scale, strict=False))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataInfo:
        """From the ``data`` dict of a train config or model.json (optional keys may be absent)."""
        return cls(
            patch_size=tuple(int(p) for p in data["patch_size"]),
            spacing=tuple(float(s) for s in data["spacing"]),
            window=dict(data["window"]),
            resize_inplane=bool(data.get("resize_inplane", False)),
            output_scale=tuple(int(s) for s in data.get("output_scale", (1, 1, 1))),
        )

    @classmethod
    def from_manifest(cls, manifest: Any) -> DataInfo:
        """From a shard manifest (``ctray.data.shards.Manifest``)."""
        return cls(
            patch_size=tuple(manifest.patch_size),
            spacing=tuple(manifest.spacing),
            window=dict(manifest.window),
            resize_inplane=bool(manifest.build.get("resize_inplane", False)),
            output_scale=tuple(int(s) for s in manifest.build.get("output_scale", (1, 1, 1))),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON form; optional keys are written only when set (older readers)."""
        out: dict[str, Any] = {
            "patch_size": list(self.patch_size),
            "spacing": list(self.spacing),
            "window": dict(self.window),
        }
        if self.resize_inplane:
            out["resize_inplane"] = True
        if not self.same_grid:
            out["output_scale"] = list(self.output_scale)
        return out


@dataclass(kw_only=True)
class StepContext:
    """What a family's train/eval step may use; the generic loop owns everything in it.

    Attributes:
        models: the stage's modules: trained ones (DDP-wrapped when distributed) and the
            frozen modules of earlier stages (bare, in ``eval()``, no gradient). In
            evaluation, a model with an EMA copy is replaced by that copy.
        optimizers: the stage's optimisers, by name.
        step: global optimiser step of this stage (counts updates, across epochs and resumes).
        optimize: ``optimize(loss, *optimizer_names)`` back-propagates ``loss`` and, on every
            ``accumulate``-th call per optimiser, clips its gradients and steps it. Families
            call this instead of ``loss.backward(); opt.step()``.
    """

    models: Models
    optimizers: Optimizers
    config: Any
    data: DataInfo
    stage: str
    epoch: int
    num_epochs: int
    step: int
    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]]
    optimize: Callable[..., bool]


@dataclass(frozen=True, kw_only=True)
class Condition:
    """A conditioning input a user types at predict time (e.g. ``target_phase=venous``)."""

    parse: Callable[[str], Any]
    default: str | None
    help: str


@dataclass(frozen=True, kw_only=True)
class ViewInputs:
    """The hook of a family whose input is N 2D projection images (X-ray views), not a volume.

    The server takes the views as a multipart upload and the CLI sends them; the family says
    what it expects and turns decoded 2D arrays into the tensor ``predict`` takes.

    Attributes:
        describe: (config, data) -> JSON description of the views to send (count, names in
            order, angles, geometry, image size, accepted formats).
        prepare: (arrays, config, data) -> tensor (1, V, H, W) for ``predict``; ``arrays`` are
            decoded 2D float arrays in upload order, in whatever intensity scale the file had
            (8/16-bit images, float NIfTI), so normalisation must not depend on it. Raises
            ValueError with a message that says what is expected (wrong count, size that
            cannot be resized, NaN ...).
        output_grid: (config, data) -> (affine, shape) of the volume ``predict`` returns.
        render: (ct volume, config, data) -> {view name: 2D array}: exactly the views the model
            expects, rendered from a CT (``ctray drr``: to try a model, and for tests).
    """

    describe: Callable[[Any, DataInfo], dict[str, Any]]
    prepare: Callable[[list[Any], Any, DataInfo], torch.Tensor]
    output_grid: Callable[[Any, DataInfo], tuple[Any, tuple[int, int, int]]]
    render: Callable[[Any, Any, DataInfo], dict[str, Any]]


def _no_warmup(config: Any) -> int:
    return 0


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One training stage of a family: what it trains, how, and what it is judged by.

    Models of earlier stages come in frozen (loaded from an earlier export or trained earlier
    in the same run); models of later stages are not built into the step context at all.

    Attributes:
        name: stage name (``train`` for single-stage families).
        trains: the modules this stage optimises.
        build_optimizers: (config, models) -> named optimisers over ``trains`` only.
        train_step: one optimisation step on a batch (calls ``ctx.optimize``); returns scalar
            losses for logging.
        eval_step: per-sample validation metrics, each a tensor of shape (B,); NaN = not
            applicable for that sample. Baselines are reported as ``<baseline>_<metric>``.
        preview: (models, batch, config) -> (input, output, target) 3D tensors for montages.
        metric/mode: what Tune optimises in this stage; reported as ``val/<metric>``.
        inference_models: modules the export of this stage carries (earlier stages' included),
            so an export is self-contained.
        ema: trained modules that keep an exponential moving average; the average is what
            evaluation sees and what is exported.
        warmup_epochs: (config) -> epochs before the metric reflects training (e.g. a
            detector pre-training phase); early stopping never judges a trial before them.
        init: optional training-time hook (config, models) run once on a fresh start, the only
            place a family may read files (e.g. a pretrained encoder); never on export load.
        loop_defaults: LoopConfig values this stage needs unless the user overrides them
            (e.g. ``{"grad_clip": 1.0, "val_every": 2}``).
        objectives: further (metric, mode) pairs searched beside ``metric``/``mode``: the search
            becomes multi-objective (Optuna over all of them; early stopping still judges
            ``metric`` alone) and its result is a Pareto front, not one best trial.
        select: picks the exported point of that front: given the front's points as
            ``{metric: value}`` dicts (``metric`` and every objective), returns the index of
            one. None: the front's best ``metric``.
    """

    name: str
    trains: tuple[str, ...]
    build_optimizers: Callable[[Any, Models], Optimizers]
    train_step: Callable[[StepContext, Batch], dict[str, float]]
    eval_step: Callable[[StepContext, Batch], dict[str, torch.Tensor]]
    preview: Callable[[Models, Batch, Any], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    metric: str
    mode: str
    inference_models: tuple[str, ...]
    ema: tuple[str, ...] = ()
    warmup_epochs: Callable[[Any], int] = _no_warmup
    init: Callable[[Any, Models], None] | None = None
    loop_defaults: Mapping[str, Any] = field(default_factory=dict)
    objectives: tuple[tuple[str, str], ...] = ()
    select: Callable[[list[dict[str, float]]], int] | None = None

    def __post_init__(self) -> None:
        for metric, mode in ((self.metric, self.mode), *self.objectives):
            if mode not in ("min", "max"):
                raise ValueError(
                    f"stage {self.name!r}: mode of {metric!r} must be 'min' or 'max', got {mode!r}"
                )
        names = [self.metric, *(m for m, _ in self.objectives)]
        if len(set(names)) != len(names):
            raise ValueError(f"stage {self.name!r}: an objective is listed twice: {names}")
        if self.select is not None and not self.objectives:
            raise ValueError(f"stage {self.name!r}: select needs objectives (a Pareto front)")
        stray = sorted(set(self.ema) - set(self.trains))
        if stray:
            raise ValueError(f"stage {self.name!r}: EMA of untrained module(s) {stray}")


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """Everything ctray needs to train, tune, export and serve one model family.

    Attributes:
        build_models: (config, data) -> every named module of every stage; pure construction
            (no file I/O), so an export loads anywhere with only its own directory.
        stages: ordered training stages; the last one's export is the servable model.
        predict: (models, x, config, conditioning) -> y on normalised patches (B, 1, *patch);
            y is ``data.output_scale`` times larger per axis than x.
        build_shards: the family's data builder behind ``ctray data build``.
        columns: shard columns the steps read.
        baselines: names of the trivial baselines eval steps report beside the model
            (``identity``, ``cubic`` ...): the run summary prints the model beside each.
        views: set by families whose input is 2D views instead of a volume (X-ray to CT);
            ``predict`` then maps (B, V, H, W) views to (B, 1, *output grid) volumes.
        data_family: the family whose shards this one reads, when it shares another family's
            data builder (``build_shards``) instead of having its own; such shards record
            that family in their manifest, and both families train on them. None: its own.
    """

    name: str
    description: str
    config_cls: type
    build_models: Callable[[Any, DataInfo], Models]
    stages: tuple[Stage, ...]
    predict: Callable[[Models, torch.Tensor, Any, Mapping[str, Any]], torch.Tensor]
    build_shards: Callable[..., Any]
    columns: tuple[str, ...]
    baselines: tuple[str, ...] = ()
    views: ViewInputs | None = None
    conditioning: Mapping[str, Condition] = field(default_factory=dict)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    data_family: str | None = None

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"family {self.name!r} declares no stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name!r}: duplicate stage names {names}")

    @property
    def shards_family(self) -> str:
        """The family name the manifests of this family's shards carry."""
        return self.data_family or self.name

    @property
    def final(self) -> Stage:
        """The last stage: its export is what the server hosts."""
        return self.stages[-1]

    def stage(self, name: str | None = None) -> Stage:
        """The stage called ``name`` (None: the only stage); unknown names list valid ones."""
        if name is None:
            if len(self.stages) > 1:
                raise ValueError(
                    f"family {self.name!r} trains in stages; pick one of: "
                    f"{', '.join(self.stage_names())}"
                )
            return self.stages[0]
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(
            f"family {self.name!r} has no stage {name!r}; valid stages: "
            f"{', '.join(self.stage_names())}"
        )

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def earlier(self, stage: Stage) -> tuple[Stage, ...]:
        """The stages before ``stage``, whose modules it uses frozen."""
        return self.stages[: self.stages.index(stage)]

    def frozen_modules(self, stage: Stage) -> tuple[str, ...]:
        """What earlier stages export (their ``inference_models``) and ``stage`` does not
        train: loaded from that export, frozen, never DDP-wrapped. An earlier stage's
        training-only modules (e.g. its discriminator) are not carried forward."""
        out: list[str] = []
        for s in self.earlier(stage):
            out.extend(m for m in s.inference_models if m not in out and m not in stage.trains)
        return tuple(out)

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
    "maskgit_fsq": "ctray.families.maskgit_fsq.spec:SPEC",
    "phase_gan": "ctray.families.phase_gan.spec:SPEC",
    "pix2pix": "ctray.families.pix2pix.spec:SPEC",
    "slice_ldm": "ctray.families.slice_ldm.spec:SPEC",
    "xray2ct": "ctray.families.xray2ct.spec:SPEC",
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
