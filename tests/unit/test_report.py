"""The model-beside-baselines table every run prints and every export carries."""

from __future__ import annotations

import math

from ctray.tune.report import baseline_rows, format_baseline_report


def test_rows_pair_model_and_baselines_per_group_and_skip_empty_groups() -> None:
    metrics = {
        "val/mae_hu": 10.0,
        "val/identity_mae_hu": 20.0,
        "val/venous/mae_hu": 8.0,
        "val/venous/identity_mae_hu": 32.0,
        "val/native/mae_hu": math.nan,  # no validation sample of this group
        "val/native/identity_mae_hu": math.nan,
        "val/detector_acc": 0.9,  # no baseline: not a row
        "train/loss": 1.0,
    }
    rows = baseline_rows(metrics, ["identity"])
    assert [(r["group"], r["metric"], r["model"], r["identity"]) for r in rows] == [
        ("all", "mae_hu", 10.0, 20.0),
        ("venous", "mae_hu", 8.0, 32.0),
    ]
    table = format_baseline_report(rows, ["identity"]).splitlines()
    assert table[0].split() == ["group", "metric", "model", "identity", "model/identity"]
    assert table[2].split() == ["venous", "mae_hu", "8", "32", "0.25"]


def test_a_model_metric_without_value_is_kept_beside_a_baseline() -> None:
    rows = baseline_rows({"val/psnr": math.nan, "val/cubic_psnr": 30.0}, ["cubic"])
    assert len(rows) == 1 and math.isnan(rows[0]["model"])
    assert format_baseline_report([], ["cubic"]) == "(no metric with a baseline)"
