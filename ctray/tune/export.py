"""Export the best trial of a search (or any Train checkpoint) as a model directory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ray.train import Checkpoint
from ray.tune import Result, ResultGrid

from ctray.data.shards import load_manifest
from ctray.modeldir import export_model, read_meta, weights_digest
from ctray.registry import Stage, get_family
from ctray.train.loop import exported_weights
from ctray.train.state import read_config, read_state
from ctray.tune.pareto import choose, pareto_front
from ctray.tune.report import baseline_rows, format_baseline_report
from ctray.tune.runner import metric_name

PARETO_FILE = "pareto.json"


def export_checkpoint(
    checkpoint_path: str,
    out: str | Path,
    *,
    metrics: dict[str, Any],
    source: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Turn a Train checkpoint (local path or URI) into ``out`` (see ctray.modeldir).

    The export carries ``report.json`` / ``report.txt``: the validation metrics beside the
    family's baselines (see ctray.tune.report), and any ``extra_files`` (name -> text).
    """
    with Checkpoint(checkpoint_path).as_directory() as ckpt:
        config = read_config(ckpt)
        state = read_state(ckpt)
    spec = get_family(config["loop"]["family"])
    stage = spec.stage(config["loop"].get("stage"))
    val = {k.removeprefix("val/"): v for k, v in metrics.items() if k.startswith("val/")}
    return export_model(
        out,
        spec=spec,
        stage=stage.name,
        family_config=config["family_config"],
        data=config["data"],
        state=exported_weights(state),
        lineage=lineage(config["loop"].get("init_from")),
        extra_files={**report_files(metrics, spec.baselines), **(extra_files or {})},
        build=_training_build(config.get("data_dir")),
        metrics={**val, "epoch": metrics.get("epoch")} if "epoch" in metrics else val,
        source={
            "checkpoint": checkpoint_path,
            "data_fingerprint": config.get("fingerprint"),
            **(source or {}),
        },
    )


def _training_build(data_dir: str | None) -> dict[str, Any]:
    """The build settings of the shards the model trained on (patch, spacing, window, family
    options), so `ctray evaluate` can say how to build matching shards; {} if unreadable."""
    try:
        return load_manifest(data_dir).build if data_dir else {}
    except (FileNotFoundError, ValueError, KeyError):
        return {}


def report_files(metrics: dict[str, Any], baselines: tuple[str, ...]) -> dict[str, str]:
    """report.json (rows) and report.txt (the table) of the model beside its baselines."""
    if not baselines:
        return {}
    rows = baseline_rows(metrics, baselines)
    finite = [
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
        for r in rows
    ]
    return {
        "report.json": json.dumps({"baselines": list(baselines), "rows": finite}, indent=2),
        "report.txt": format_baseline_report(rows, baselines) + "\n",
    }


def lineage(init_from: str | None) -> list[dict[str, Any]]:
    """Where the frozen earlier stages came from: their exports' lineage plus that export."""
    if not init_from:
        return []
    meta = read_meta(init_from)
    return [
        *meta.get("lineage", []),
        {
            "stage": meta.get("stage"),
            "export": str(init_from),
            "weights_sha256": weights_digest(init_from),
            "data_fingerprint": meta.get("source", {}).get("data_fingerprint"),
        },
    ]


def pareto_report(results: list[Result], stage: Stage) -> tuple[Result, dict[str, Any]]:
    """The trial a multi-objective stage exports, and the ``pareto.json`` record of the front.

    Every finished trial's last validation metrics are a point; the front is computed over
    them (``ctray.tune.pareto``) and ``stage.select`` picks one of its points (default: the
    best primary metric).
    """
    objectives = [(stage.metric, stage.mode), *stage.objectives]
    points = [{m: r.metrics.get(f"val/{m}", math.nan) for m, _ in objectives} for r in results]
    front = pareto_front(points, objectives)
    picked = front[choose([points[i] for i in front], objectives, stage.select)]
    rule = (stage.select.__doc__ or "").strip().splitlines() if stage.select else []
    record = {
        "objectives": [list(o) for o in objectives],
        "rule": rule[0] if rule else f"the best {stage.metric} ({stage.mode}) on the front",
        "chosen": results[picked].metrics.get("trial_id"),
        "trials": [
            {
                "trial": r.metrics.get("trial_id"),
                "on_front": i in front,
                "chosen": i == picked,
                **{m: _finite(v) for m, v in points[i].items()},
                "config": r.config,
                "metrics": {
                    k.removeprefix("val/"): _finite(float(v))
                    for k, v in r.metrics.items()
                    if k.startswith("val/") and "/" not in k[4:] and isinstance(v, int | float)
                },
            }
            for i, r in enumerate(results)
        ],
    }
    return results[picked], record


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def format_pareto(record: dict[str, Any]) -> str:
    """The front of a ``pareto.json`` record as a plain-text table (chosen point marked)."""
    metrics = [m for m, _ in record["objectives"]]
    rows = [t for t in record["trials"] if t["on_front"]]
    params = sorted({k for t in rows for k in t["config"]})
    head = ["", "trial", *metrics, *params]
    body = [
        [
            "*" if t["chosen"] else "",
            str(t["trial"]),
            *("-" if t[m] is None else f"{t[m]:.4g}" for m in metrics),
            *(_cell(t["config"].get(p)) for p in params),
        ]
        for t in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *body]
    ]
    return "\n".join(lines) + f"\n* exported: {record['rule']}"


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def export_best(
    grid: ResultGrid, family: str, out: str | Path, *, experiment: str, stage: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """Export the trial with the best last-reported validation metric; returns (path, metrics).

    A multi-objective stage (``Stage.objectives``) exports the point of the Pareto front its
    ``select`` rule picks and writes the front beside the weights (``pareto.json``).
    """
    spec = get_family(family)
    trained = spec.stage(stage) if stage else spec.final
    ok = [r for r in grid if r.error is None and r.metrics and "checkpoint_path" in r.metrics]
    if not ok:
        errors = "; ".join(str(r.error).splitlines()[0] for r in grid if r.error)
        raise RuntimeError(f"no trial finished with a checkpoint{': ' + errors if errors else ''}")
    extra: dict[str, str] = {}
    if trained.objectives:
        best, record = pareto_report(ok, trained)
        extra[PARETO_FILE] = json.dumps(record, indent=2)
    else:
        metric = metric_name(family, trained.name)
        best = grid.get_best_result(
            metric=metric, mode=trained.mode, scope="last", filter_nan_and_inf=True
        )
    metrics = dict(best.metrics)
    path = export_checkpoint(
        metrics["checkpoint_path"],
        out,
        metrics=metrics,
        source={"experiment": experiment, "trial": metrics.get("trial_id"), "config": best.config},
        extra_files=extra,
    )
    return path, metrics
