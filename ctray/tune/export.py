"""Export the best trial of a search (or any Train checkpoint) as a model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.train import Checkpoint
from ray.tune import ResultGrid

from ctray.modeldir import export_model
from ctray.registry import get_family
from ctray.train.loop import CONFIG_FILE, STATE_FILE, load_state
from ctray.tune.runner import metric_name


def export_checkpoint(
    checkpoint_path: str,
    out: str | Path,
    *,
    metrics: dict[str, Any],
    source: dict[str, Any] | None = None,
) -> Path:
    """Turn a Train checkpoint (local path or URI) into ``out`` (see ctray.modeldir)."""
    with Checkpoint(checkpoint_path).as_directory() as ckpt:
        config = json.loads((Path(ckpt) / CONFIG_FILE).read_text())
        state = load_state(Path(ckpt) / STATE_FILE)
    spec = get_family(config["loop"]["family"])
    val = {k.removeprefix("val/"): v for k, v in metrics.items() if k.startswith("val/")}
    return export_model(
        out,
        spec=spec,
        family_config=config["family_config"],
        data=config["data"],
        state=state["models"],
        metrics={**val, "epoch": metrics.get("epoch")} if "epoch" in metrics else val,
        source={
            "checkpoint": checkpoint_path,
            "data_fingerprint": config.get("fingerprint"),
            **(source or {}),
        },
    )


def export_best(
    grid: ResultGrid, family: str, out: str | Path, *, experiment: str
) -> tuple[Path, dict[str, Any]]:
    """Export the trial with the best last-reported validation metric; returns (path, metrics)."""
    spec = get_family(family)
    ok = [r for r in grid if r.error is None and r.metrics and "checkpoint_path" in r.metrics]
    if not ok:
        errors = "; ".join(str(r.error).splitlines()[0] for r in grid if r.error)
        raise RuntimeError(f"no trial finished with a checkpoint{': ' + errors if errors else ''}")
    metric = metric_name(family)
    best = grid.get_best_result(
        metric=metric, mode=spec.mode, scope="last", filter_nan_and_inf=True
    )
    metrics = dict(best.metrics)
    path = export_checkpoint(
        metrics["checkpoint_path"],
        out,
        metrics=metrics,
        source={"experiment": experiment, "trial": metrics.get("trial_id"), "config": best.config},
    )
    return path, metrics
