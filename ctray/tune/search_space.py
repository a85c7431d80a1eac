"""Declarative search spaces (``search_spaces/<family>.yaml``), validated against the family.

File format::

    family: phase_gan
    preset: demo               # the base config that samples override (optional)
    params:
      lambda_l1: {loguniform: [1.0, 100.0]}
      grl_schedule: {choice: [constant, linear, dann]}
      vit_layers: {randint: [1, 4]}      # integers in [low, high)
      grl_max: {uniform: [0.25, 1.0]}

A family that trains in stages gives each stage its own parameters instead of ``params``::

    family: slice_ldm
    preset: demo
    stages:
      autoencoder:
        params: {lr_ae: {loguniform: [1.0e-4, 1.0e-3]}}
      diffusion:
        params: {lr_diffusion: {loguniform: [5.0e-5, 5.0e-4]}}

Every key must be a field of the family's config dataclass, every value must type-check
against it; the error lists what is valid.

``points_to_evaluate`` (top level, or per stage beside its ``params``) lists configurations
Optuna tries first, each giving a value for every parameter searched (e.g. both ends of a
trade-off, so a multi-objective search's front spans it)::

    stages:
      tokenizer:
        params:
          fsq_levels: {choice: ["8,6,5", "8,5,5,5", "8,8,8,6,5"]}
          lr_tokenizer: {loguniform: [5.0e-4, 3.0e-3]}
        points_to_evaluate:
          - {fsq_levels: "8,6,5", lr_tokenizer: 1.0e-3}
          - {fsq_levels: "8,8,8,6,5", lr_tokenizer: 1.0e-3}
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from ctray.config import ConfigError, check_keys, from_dict, load_yaml, to_dict
from ctray.registry import FamilySpec, get_family

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
SEARCH_SPACE_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """A validated search space: the family, its base config and the sampled parameters."""

    family: str
    base: dict[str, Any]
    params: dict[str, tuple[str, list[Any]]] = field(default_factory=dict)
    stage_params: dict[str, dict[str, tuple[str, list[Any]]]] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    stage_points: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    source: str = "<dict>"

    @property
    def spec(self) -> FamilySpec:
        return get_family(self.family)

    def for_stage(self, stage: str) -> SearchSpace:
        """The space of one stage: shared ``params`` plus that stage's own."""
        self.spec.stage(stage)
        own = self.stage_params.get(stage, {})
        return dataclasses.replace(
            self,
            params={**self.params, **own},
            stage_params={},
            points=self.stage_points.get(stage, self.points),
            stage_points={},
        )

    def tune_space(self) -> dict[str, Any]:
        """Ray Tune sampling objects (OptunaSearch converts them to Optuna distributions)."""
        out: dict[str, Any] = {}
        for key, (kind, args) in self.params.items():
            if kind == "choice":
                out[key] = tune.choice(args)
            elif kind == "randint":
                out[key] = tune.randint(int(args[0]), int(args[1]))
            else:
                out[key] = getattr(tune, kind)(float(args[0]), float(args[1]))
        return out


def _number(value: Any, where: str) -> float:
    try:
        return float(value)  # YAML 1.1 reads "1e-4" as a string; accept it.
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a number") from None


def _check_param(
    spec: FamilySpec, key: str, raw: Any, base: dict[str, Any], where: str
) -> tuple[str, list[Any]]:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(f"{where}: {key} must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}")
    ((kind, args),) = raw.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where}: {key}: unknown distribution {kind!r}; valid: {', '.join(DISTRIBUTIONS)}"
        )
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {key}: {kind} needs a list of values")
    hint = typing.get_type_hints(spec.config_cls)[key]
    if kind == "choice":
        samples = args
    else:
        if len(args) != 2:
            raise ConfigError(f"{where}: {key}: {kind} needs [low, high]")
        low, high = (_number(a, f"{where}: {key}") for a in args)
        if not low < high:
            raise ConfigError(f"{where}: {key}: low {low} must be below high {high}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: {key}: loguniform needs low > 0")
        if kind == "randint" and hint is not int:
            raise ConfigError(f"{where}: {key}: randint needs an int field")
        if kind != "randint" and hint not in (float, float | None):
            raise ConfigError(f"{where}: {key}: {kind} needs a float field, {key} is {hint}")
        args = [int(low), int(high)] if kind == "randint" else [low, high]
        samples = [args[0]]
    for value in samples:
        from_dict(spec.config_cls, {**base, key: value}, where=f"{where}: {key}")
    return kind, list(args)


def _check_points(
    spec: FamilySpec,
    raw: Any,
    params: dict[str, tuple[str, list[Any]]],
    base: dict[str, Any],
    where: str,
) -> list[dict[str, Any]]:
    """Points to evaluate first: each sets every searched parameter to a value it can take."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise ConfigError(f"{where}: expected a list of {{parameter: value}} mappings")
    points = []
    for k, point in enumerate(raw):
        here = f"{where}[{k}]"
        if set(point) != set(params):
            raise ConfigError(
                f"{here}: give exactly the searched parameters {sorted(params)}, "
                f"got {sorted(point)}"
            )
        for key, value in point.items():
            kind, args = params[key]
            if kind == "choice":
                inside = value in args
            elif kind == "randint":
                inside = isinstance(value, int) and args[0] <= value < args[1]
            else:
                inside = isinstance(value, int | float) and args[0] <= value <= args[1]
            if not inside:
                raise ConfigError(f"{here}: {key}={value!r} is outside its {kind} {args}")
        from_dict(spec.config_cls, {**base, **point}, where=here)
        points.append(dict(point))
    return points


def parse_search_space(data: dict[str, Any], *, source: str = "<dict>") -> SearchSpace:
    """Validate a search-space mapping; errors name the file, the key and the valid choices."""
    check = {"family", "preset", "base", "params", "stages", "points_to_evaluate"}
    unknown = sorted(set(data) - check)
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; valid: {sorted(check)}")
    if "family" not in data:
        raise ConfigError(f"{source}: missing 'family'")
    spec = get_family(data["family"])
    base = spec.preset(data["preset"]) if data.get("preset") else {}
    base.update(data.get("base") or {})
    check_keys(spec.config_cls, base, where=f"{source}: base")
    to_dict(from_dict(spec.config_cls, base, where=f"{source}: base"))
    params_raw = data.get("params") or {}
    check_keys(spec.config_cls, params_raw, where=f"{source}: params")
    params = {k: _check_param(spec, k, v, base, f"{source}: params") for k, v in params_raw.items()}
    stages = data.get("stages") or {}
    if stages and data.get("points_to_evaluate") is not None:
        raise ConfigError(f"{source}: with stages, give points_to_evaluate per stage")
    where = f"{source}: points_to_evaluate"
    points = _check_points(spec, data.get("points_to_evaluate"), params, base, where)
    stage_params: dict[str, dict[str, tuple[str, list[Any]]]] = {}
    stage_points: dict[str, list[dict[str, Any]]] = {}
    for stage, body in stages.items():
        try:
            spec.stage(stage)
        except KeyError as err:
            raise ConfigError(f"{source}: stages: {err.args[0]}") from None
        if not isinstance(body, dict) or set(body) - {"params", "points_to_evaluate"}:
            raise ConfigError(
                f"{source}: stages: {stage}: expected a mapping with 'params' "
                "(and optionally 'points_to_evaluate')"
            )
        where = f"{source}: stages: {stage}: params"
        raw = body.get("params") or {}
        check_keys(spec.config_cls, raw, where=where)
        stage_params[stage] = {k: _check_param(spec, k, v, base, where) for k, v in raw.items()}
        if body.get("points_to_evaluate") is not None:
            stage_points[stage] = _check_points(
                spec,
                body["points_to_evaluate"],
                {**params, **stage_params[stage]},
                base,
                f"{source}: stages: {stage}: points_to_evaluate",
            )
    return SearchSpace(
        family=spec.name,
        base=base,
        params=params,
        stage_params=stage_params,
        points=points,
        stage_points=stage_points,
        source=source,
    )


def load_search_space(path_or_family: str | Path) -> SearchSpace:
    """Load ``search_spaces/<family>.yaml`` by family name, or any YAML file by path."""
    path = Path(path_or_family)
    if not path.suffix and not path.exists():
        path = SEARCH_SPACE_DIR / f"{path_or_family}.yaml"
    return parse_search_space(load_yaml(path), source=str(path))
