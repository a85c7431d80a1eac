"""The model beside its trivial baselines: the table every run prints and every export carries.

Eval steps report ``[group/]metric`` for the model and ``[group/]<baseline>_metric`` for each
baseline the family declares (``identity``, ``linear``, ``cubic`` ...), where ``group`` is an
optional breakdown such as a target phase. This module pairs them up; it knows no family.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def baseline_rows(
    metrics: Mapping[str, Any], baselines: Sequence[str], *, prefix: str = "val/"
) -> list[dict[str, Any]]:
    """One row per model metric that has at least one baseline value beside it.

    Rows where neither the model nor any baseline has a finite value are left out.

    Rows: ``{"group", "metric", "model", <baseline>: value, ...}``, overall metrics first,
    then groups in name order.
    """
    values = {
        k[len(prefix) :]: float(v)
        for k, v in metrics.items()
        if k.startswith(prefix) and isinstance(v, int | float) and not isinstance(v, bool)
    }
    rows = []
    for key, value in values.items():
        group, _, name = key.rpartition("/")
        if any(name.startswith(f"{b}_") for b in baselines):
            continue
        scope = f"{group}/" if group else ""
        beside = {b: values.get(f"{scope}{b}_{name}") for b in baselines}
        if all(v is None for v in beside.values()):
            continue
        if not _finite(value) and not any(_finite(v) for v in beside.values()):
            continue  # a group the validation data does not have (e.g. an untrained phase)
        rows.append({"group": group or "all", "metric": name, "model": value, **beside})
    rows.sort(key=lambda r: (r["group"] != "all", r["group"], r["metric"]))
    return rows


def format_baseline_report(rows: Sequence[Mapping[str, Any]], baselines: Sequence[str]) -> str:
    """A plain-text table: group, metric, model, each baseline, model/first-baseline ratio."""
    if not rows:
        return "(no metric with a baseline)"
    head = ["group", "metric", "model", *baselines, f"model/{baselines[0]}"]
    body = []
    for r in rows:
        cells = [r["model"], *(r.get(b) for b in baselines), ratio(r, baselines[0])]
        body.append([r["group"], r["metric"], *map(number, cells)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(line.rstrip() for line in lines)


def ratio(row: Mapping[str, Any], baseline: str) -> float:
    """The model's value over ``baseline``'s in a row; NaN where that is undefined."""
    first = row.get(baseline)
    return row["model"] / first if first and math.isfinite(first) else math.nan


def number(v: Any) -> str:
    """4 significant digits; ``-`` for a missing or non-finite value."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4g}"


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)
