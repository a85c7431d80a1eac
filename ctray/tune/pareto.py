"""Pareto fronts of multi-objective searches (pure functions: no Ray, no family).

A point is a mapping of metric name to value; objectives are (metric, mode) pairs. A point
dominates another when it is at least as good on every objective and better on one; the front
is the set of points no other point dominates. Points missing an objective, or with a NaN or
infinite value, are not on the front.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Objectives = Sequence[tuple[str, str]]


def _valid(point: Mapping[str, Any], objectives: Objectives) -> bool:
    for metric, _ in objectives:
        value = point.get(metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return False
    return True


def _better_or_equal(a: float, b: float, mode: str) -> bool:
    return a >= b if mode == "max" else a <= b


def dominates(a: Mapping[str, float], b: Mapping[str, float], objectives: Objectives) -> bool:
    """Whether ``a`` is at least as good as ``b`` on every objective and better on one."""
    if not all(_better_or_equal(a[m], b[m], mode) for m, mode in objectives):
        return False
    return any(a[m] != b[m] for m, _ in objectives)


def pareto_front(points: Sequence[Mapping[str, Any]], objectives: Objectives) -> list[int]:
    """Indices of the non-dominated points, in input order (duplicates all stay on it)."""
    valid = [i for i, p in enumerate(points) if _valid(p, objectives)]
    return [
        i
        for i in valid
        if not any(dominates(points[j], points[i], objectives) for j in valid if j != i)
    ]


def choose(
    front: Sequence[Mapping[str, Any]],
    objectives: Objectives,
    select: Callable[[list[dict[str, float]]], int] | None = None,
) -> int:
    """Index into ``front`` of the point to export: ``select``'s pick, or else the best value
    of the first objective (the stage's primary metric)."""
    if not front:
        raise ValueError("the Pareto front is empty: no trial reported every objective")
    points = [{m: float(p[m]) for m, _ in objectives} for p in front]
    if select is not None:
        index = select(points)
        if not 0 <= index < len(front):
            raise ValueError(f"select returned {index}, the front has {len(front)} point(s)")
        return index
    metric, mode = objectives[0]
    values = [p[metric] for p in points]
    return values.index(max(values) if mode == "max" else min(values))
