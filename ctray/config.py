"""Kw-only config dataclasses built from plain dicts (YAML, CLI, Tune samples) with strict keys.

Every config in ctray is a dataclass; this module turns dicts into them and back, and refuses
unknown keys with a message that lists the valid ones, so a typo in a YAML file or a search
space is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and what is allowed."""


def field_names(cls: type) -> list[str]:
    """Names of a config dataclass's fields, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def check_keys(cls: type, keys: Any, *, where: str) -> None:
    """Raise ConfigError for keys that ``cls`` does not have, listing the valid ones."""
    valid = field_names(cls)
    unknown = sorted(set(keys) - set(valid))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
            f"valid keys: {', '.join(valid)}"
        )


def _coerce(value: Any, annotation: Any, *, key: str, where: str) -> Any:
    """Convert YAML/CLI values to the annotated type where it is unambiguous (tuples, floats)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key=key, where=where) if len(inner) == 1 else value
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple and not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: {key} should be a list, got {value!r}")
    if origin is tuple:
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where}: {key} needs {len(args)} values, got {len(value)}")
        item_types = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args)
        return tuple(
            _coerce(v, t, key=key, where=where) for v, t in zip(value, item_types, strict=False)
        )
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: {key}={value!r} should be {annotation.__name__}")
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: {key}={value!r} should be {annotation.__name__}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None = None, *, where: str = "config") -> T:
    """Build ``cls`` from ``data``; unknown keys and mistyped values raise ConfigError."""
    data = dict(data or {})
    check_keys(cls, data, where=where)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], key=k, where=where) for k, v in data.items()}
    return cls(**kwargs)


def replace(cfg: T, overrides: Mapping[str, Any] | None, *, where: str = "overrides") -> T:
    """A copy of ``cfg`` with ``overrides`` applied, validated like :func:`from_dict`."""
    merged = {**to_dict(cfg), **dict(overrides or {})}
    return from_dict(type(cfg), merged, where=where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (tuples become lists, for JSON/YAML)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with an error that names the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
