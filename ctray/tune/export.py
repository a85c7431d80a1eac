"""Export the best trial of a search (or any Train checkpoint) as a model directory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ray.train import Checkpoint
from ray.tune import ResultGrid

from ctray.data.shards import load_manifest
from ctray.modeldir import export_model, read_meta, weights_digest
from ctray.registry import get_family
from ctray.train.loop import CONFIG_FILE, STATE_FILE, exported_weights, load_state
from ctray.tune.report import baseline_rows, format_baseline_report
from ctray.tune.runner import metric_name


def export_checkpoint(
    checkpoint_path: str,
    out: str | Path,
    *,
    metrics: dict[str, Any],
    source: dict[str, Any] | None = None,
) -> Path:
    """Turn a Train checkpoint (local path or URI) into ``out`` (see ctray.modeldir).

    The export carries ``report.json`` / ``report.txt``: the validation metrics beside the
    family's baselines (see ctray.tune.report).
    """
    with Checkpoint(checkpoint_path).as_directory() as ckpt:
        config = json.loads((Path(ckpt) / CONFIG_FILE).read_text())
        state = load_state(Path(ckpt) / STATE_FILE)
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
        extra_files=report_files(metrics, spec.baselines),
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


def export_best(
    grid: ResultGrid, family: str, out: str | Path, *, experiment: str, stage: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """Export the trial with the best last-reported validation metric; returns (path, metrics)."""
    spec = get_family(family)
    trained = spec.stage(stage) if stage else spec.final
    ok = [r for r in grid if r.error is None and r.metrics and "checkpoint_path" in r.metrics]
    if not ok:
        errors = "; ".join(str(r.error).splitlines()[0] for r in grid if r.error)
        raise RuntimeError(f"no trial finished with a checkpoint{': ' + errors if errors else ''}")
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
    )
    return path, metrics
