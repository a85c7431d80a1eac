"""``report.html`` of a tune run: one self-contained file (inline CSS, plots and montages as
base64 PNG, no script, no network access) that opens from a folder, a mail or an artifact store.

It shows the trials (best first: sampled parameters, state, epochs, the epoch ASHA stopped a
pruned trial at), validation curves per trial beside the family's baseline, the best model
beside its baselines, parameter importances from the Optuna study, a montage of the best model
on a validation patch, the shard manifest (inputs, skipped files and why) and wall time and
resources.

Its sources are the run record (ctray.tune.run_record) and what it names: Tune's trial results
(read with ExperimentAnalysis, no Ray session needed), the Optuna study, the shard manifest and
the exported model. A section whose source is gone (a moved export, an unreachable database)
says so and the rest of the report is still written.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctray.files import atomic_write_bytes
from ctray.registry import FamilySpec, Stage, get_family
from ctray.train.montage import DisplayWindow, display_window, montage
from ctray.tune.report import baseline_rows, number, ratio
from ctray.tune.run_record import read_record
from ctray.tune.study import load_study, redact

REPORT = "report.html"
# What a moved or deleted file, a changed format or an unreachable study raises.
SOURCE_ERRORS = (OSError, ValueError, KeyError, RuntimeError)
MIN_IMPORTANCE_TRIALS = 5
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px;
       color: #1d2430; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px;
     border-bottom: 1px solid #d5dae1; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d5dae1; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f5; } tr.best td { background: #e6f4ea; font-weight: 600; }
td.num { text-align: right; } table.trials td { white-space: nowrap; }
.muted { color: #5f6b7a; } .note { color: #8a4b00; }
code, pre { background: #f4f6f8; padding: 1px 4px; border-radius: 3px; }
pre { padding: 8px; overflow-x: auto; } img { max-width: 100%; height: auto; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dt { color: #5f6b7a; } dd { margin: 0; } .wide { overflow-x: auto; }
"""


@dataclass(frozen=True, kw_only=True)
class TrialRow:
    """One Tune trial as the report shows it.

    Attributes:
        state: ``complete`` (ran every epoch), ``pruned`` (ASHA stopped it at ``epochs``),
            ``error`` or ``unfinished`` (an interrupted run).
        last: its last reported result.
        history: per report, ``epochs_done`` and the metrics the curves plot.
    """

    trial_id: str
    state: str
    epochs: int
    last: Mapping[str, Any]
    config: Mapping[str, Any]
    history: Mapping[str, Sequence[float]]


def load_trials(run_path: str, *, max_epochs: int, keys: Sequence[str]) -> list[TrialRow]:
    """Every trial of a Tune run folder (local path or URI), in Tune's order."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(run_path)
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        epochs = int(last.get("epochs_done", 0))
        if trial.status == "ERROR":
            state = "error"
        elif trial.status == "TERMINATED":
            state = "complete" if epochs >= max_epochs else "pruned"
        else:
            state = "unfinished"
        frame = analysis.trial_dataframes.get(trial.trial_id)
        history = {
            k: [float(v) for v in frame[k]]
            for k in ("epochs_done", *keys)
            if frame is not None and k in frame
        }
        rows.append(
            TrialRow(
                trial_id=trial.trial_id,
                state=state,
                epochs=epochs,
                last=last,
                config=trial.config or {},
                history=history,
            )
        )
    return rows


def rank_trials(trials: Iterable[TrialRow], metric: str, mode: str) -> list[TrialRow]:
    """Best first by the last value of ``metric``; trials without a finite one last."""

    def key(t: TrialRow) -> tuple[bool, float]:
        value = t.last.get(metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return (True, 0.0)
        return (False, value if mode == "min" else -value)

    return sorted(trials, key=key)


# --------------------------------------------------------------------------- rendering helpers


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"<td>{_esc(value)}</td>"
    return f'<td class="num">{number(value)}</td>'


def _table(
    head: Sequence[str], rows: Iterable[Sequence[Any]], *, cls: str = "", best: int = -1
) -> str:
    body = "".join(
        f"<tr{' class=best' if i == best else ''}>{''.join(_cell(v) for v in r)}</tr>"
        for i, r in enumerate(rows)
    )
    head_html = "".join(f"<th>{_esc(h)}</th>" for h in head)
    return f'<div class="wide"><table class="{cls}"><tr>{head_html}</tr>{body}</table></div>'


def _img(png: bytes, *, cls: str, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure outside pyplot (no global state, no display backend)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "- (interrupted)"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _section(title: str, build: Callable[[], str]) -> str:
    """A section; if its source is gone, the reason instead of its content."""
    try:
        body = build()
    except SOURCE_ERRORS as err:
        body = f'<p class="note">not available: {_esc(err)}</p>'
    return f"<h2>{_esc(title)}</h2>\n{body}\n"


# --------------------------------------------------------------------------- sections


def _trials_table(trials: Sequence[TrialRow], keys: Sequence[str], best_id: str | None) -> str:
    params = sorted({k for t in trials for k in t.config})
    head = ["#", "trial", "state", "epochs", "stopped at (ASHA)", *keys, "time", *params]
    rows = []
    for i, t in enumerate(trials, 1):
        stopped = f"epoch {t.epochs}" if t.state == "pruned" else "-"
        time_s = t.last.get("time_total_s")
        rows.append(
            [
                i,
                t.trial_id + (" (exported)" if t.trial_id == best_id else ""),
                t.state,
                t.epochs,
                stopped,
                *(t.last.get(k, math.nan) for k in keys),
                _duration(time_s) if time_s is not None else "-",
                *(t.config.get(p, "") for p in params),
            ]
        )
    best = next((i for i, t in enumerate(trials) if t.trial_id == best_id), -1)
    counts = {s: sum(t.state == s for t in trials) for s in ("complete", "pruned", "error")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return (
        f"<p>{len(trials)} trial(s): {summary or 'none finished'}. Sorted by the last "
        f"validation of <code>{_esc(keys[0])}</code>.</p>"
        + _table(head, rows, cls="trials", best=best)
    )


def _curves(
    trials: Sequence[TrialRow], keys: Sequence[str], baseline: str | None, best_id: str | None
) -> str:
    from matplotlib.ticker import MaxNLocator

    drawn = [t for t in trials if t.history.get("epochs_done")]
    if not drawn:
        raise ValueError("no trial reported a validation")
    last_epoch = max(max(t.history["epochs_done"]) for t in drawn)
    source = next((t for t in drawn if baseline in t.history), None) if baseline else None
    fig = _figure(5.2 * len(keys), 3.6)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        for t in drawn:
            if key not in t.history:
                continue
            best = t.trial_id == best_id
            ax.plot(
                t.history["epochs_done"],
                t.history[key],
                marker="o",
                markersize=3,
                linewidth=2.6 if best else 1.2,
                label=f"{t.trial_id}{' (exported)' if best else ''}",
                zorder=3 if best else 2,
            )
            if t.state == "pruned":
                ax.plot(t.history["epochs_done"][-1], t.history[key][-1], "kx", markersize=8)
        if key == keys[0] and source is not None:
            ax.plot(
                source.history["epochs_done"],
                source.history[baseline],
                "--",
                marker=".",
                color="0.45",
                label=baseline.removeprefix("val/"),
            )
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    notes = ["The tuned metric per validation epoch for every trial."]
    if source is not None:
        notes.append(f"Dashed: the {baseline.removeprefix('val/')} baseline, same patches.")
    if any(t.state == "pruned" for t in drawn):
        notes.append("x: where ASHA stopped a trial (pruned).")
    return _img(_png(fig), cls="plot", alt="validation curves") + (
        f'<p class="muted">{_esc(" ".join(notes))}</p>'
    )


def _baselines(spec: FamilySpec, best: TrialRow | None) -> str:
    if best is None:
        raise ValueError("no trial reported a validation")
    if not spec.baselines:
        return '<p class="muted">This family declares no baseline.</p>'
    rows = baseline_rows(best.last, spec.baselines)
    if not rows:
        return '<p class="muted">No metric with a baseline was reported.</p>'
    head = ["metric", "model", *spec.baselines, f"model/{spec.baselines[0]}"]

    def cells(r: Mapping[str, Any]) -> list[Any]:
        values = [r["model"], *(r.get(b) for b in spec.baselines), ratio(r, spec.baselines[0])]
        return [r["metric"], *(math.nan if v is None else v for v in values)]

    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    out = [
        f"<p>Trial {_esc(best.trial_id)}, last validation (epoch {best.epochs}); "
        "the baselines are computed on the same patches.</p>",
        _table(head, [cells(r) for r in groups.pop("all", [])], cls="baselines"),
    ]
    for group, grouped in groups.items():
        out.append(
            f"<details><summary>{_esc(group)}</summary>"
            + _table(head, [cells(r) for r in grouped], cls="baselines")
            + "</details>"
        )
    return "".join(out)


def _study(optuna_info: Mapping[str, Any], url: str | None, stage: Stage) -> str:
    import optuna

    if not url:
        return (
            '<p class="muted">The Optuna study was kept in memory only (a remote --storage '
            "without --optuna-storage).</p>"
        )
    name = optuna_info["study_name"]
    study = load_study(url, name)
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    shown = redact(url)
    parts = [
        "<dl>",
        f"<dt>storage</dt><dd><code>{_esc(shown)}</code></dd>",
        f"<dt>study</dt><dd><code>{_esc(name)}</code></dd>",
        f"<dt>trials</dt><dd>{len(study.trials)} "
        f"({', '.join(f'{n} {s}' for s, n in sorted(states.items()))})</dd>",
        "</dl>",
        "<p>Open it with <code>pip install optuna-dashboard</code>, then "
        f"<code>optuna-dashboard {_esc(shown)}</code>, or in Python: "
        f"<code>optuna.load_study(study_name={name!r}, storage={shown!r})</code>.</p>",
    ]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    params = {p for t in complete for p in t.params}
    if len(complete) < MIN_IMPORTANCE_TRIALS or not params:
        parts.append(
            f'<p class="note">Parameter importances need at least {MIN_IMPORTANCE_TRIALS} '
            f"completed trials with sampled parameters (fewer give noise); this study has "
            f"{len(complete)} (pruned ones are not used).</p>"
        )
        return "".join(parts)
    # Several objectives: the primary one, as a value to minimise (PED-ANOVA's convention).
    sign = -1.0 if stage.mode == "max" else 1.0
    target = (lambda t: sign * t.values[0]) if stage.objectives else None
    try:
        importances = optuna.importance.get_param_importances(study, target=target)
    except (RuntimeError, ValueError) as err:
        parts.append(f'<p class="note">Parameter importances not computed: {_esc(err)}</p>')
        return "".join(parts)
    names = list(importances)[::-1]
    fig = _figure(6.5, 0.35 * len(names) + 1.2)
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="#3b6ea8")
    ax.set_xlabel(f"importance for val/{stage.metric} (PED-ANOVA, {len(complete)} trials)")
    ax.grid(axis="x", alpha=0.3)
    parts.append(_img(_png(fig), cls="plot", alt="parameter importances"))
    return "".join(parts)


def _pareto(trials: Sequence[TrialRow], stage: Stage) -> str:
    (x_name, x_mode), (y_name, y_mode) = (stage.metric, stage.mode), stage.objectives[0]
    points = [
        (t.trial_id, t.last.get(f"val/{x_name}"), t.last.get(f"val/{y_name}")) for t in trials
    ]
    points = [p for p in points if all(isinstance(v, int | float) for v in p[1:])]
    if not points:
        raise ValueError("no trial reported both objectives")
    fig = _figure(5.5, 4.0)
    ax = fig.subplots()
    ax.scatter([p[1] for p in points], [p[2] for p in points], color="#3b6ea8")
    for trial_id, x, y in points:
        ax.annotate(trial_id, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"val/{x_name} ({x_mode})")
    ax.set_ylabel(f"val/{y_name} ({y_mode})")
    ax.grid(alpha=0.3)
    return _img(_png(fig), cls="plot", alt="objectives of every trial") + (
        '<p class="muted">Last validation of every trial; the export carries the Pareto front '
        "and the rule that picked the exported point (<code>pareto.json</code>).</p>"
    )


def best_montage_png(
    export: str | Path, data_dir: str | Path, display: str | DisplayWindow
) -> bytes:
    """The exported model's montage (ctray.train.montage) on the first validation patch."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from ctray.data.shards import column_numpy, load_manifest
    from ctray.modeldir import load_model

    model = load_model(export)
    files = load_manifest(data_dir).shard_files(data_dir, "val")
    if not files:
        raise ValueError(f"{data_dir}: no validation rows to show")
    table = pq.read_table(files[0], columns=list(model.spec.columns)).slice(0, 1)
    batch = {
        c: torch.from_numpy(np.array(column_numpy(table.column(c)))) for c in model.spec.columns
    }
    stage = model.spec.stage(model.meta["stage"])
    with torch.no_grad():
        volumes = stage.preview(model.models, batch, model.config)
    buffer = io.BytesIO()
    Image.fromarray(montage(*volumes, data=model.data, display=display)).save(buffer, "PNG")
    return buffer.getvalue()


def _montage(record: Mapping[str, Any]) -> str:
    export = record.get("export")
    if not export:
        raise ValueError("the run has not exported a model yet")
    window = display_window(record["display_window"])
    png = best_montage_png(export, record["data_dir"], window)
    return _img(png, cls="montage", alt="montage of the best model") + (
        f'<p class="muted">Exported model <code>{_esc(export)}</code> on the first validation '
        f"patch, through the patch centre, display window {_esc(window.label())} HU. Another "
        "window: <code>ctray report DIR --display-window lung|bone|soft_tissue|LEVEL/WIDTH</code>"
        ".</p>"
    )


def _manifest(data_dir: str) -> str:
    from ctray.data.shards import load_manifest

    manifest = load_manifest(data_dir)
    window = manifest.window
    parts = [
        "<dl>",
        f"<dt>shards</dt><dd><code>{_esc(data_dir)}</code></dd>",
        f"<dt>family</dt><dd>{_esc(manifest.family)} (fingerprint "
        f"<code>{_esc(manifest.fingerprint)}</code>)</dd>",
        f"<dt>patch</dt><dd>{'x'.join(map(str, manifest.patch_size))} voxels at "
        f"{'x'.join(f'{s:g}' for s in manifest.spacing)} mm</dd>",
        f"<dt>HU window</dt><dd>{window['lo']:g} .. {window['hi']:g} HU mapped to [0, 1]</dd>",
        f"<dt>rows</dt><dd>{', '.join(f'{k} {v}' for k, v in manifest.counts.items())}</dd>",
        f"<dt>inputs</dt><dd>{len(manifest.inputs)} used, {len(manifest.skipped)} skipped</dd>",
        "</dl>",
    ]
    if manifest.skipped:
        parts.append(
            "<p>Skipped inputs:</p>"
            + _table(
                ["input", "reason"],
                [[s.get("path", "?"), s.get("reason", "?")] for s in manifest.skipped],
                cls="skipped",
            )
        )
    parts.append(
        "<details><summary>inputs</summary>"
        + _table(
            ["subject", "split", "rows", "shape", "spacing (mm)"],
            [
                [
                    r.subject,
                    r.split,
                    r.rows,
                    "x".join(map(str, r.shape)),
                    "x".join(f"{s:.3g}" for s in r.spacing),
                ]
                for r in manifest.inputs
            ],
            cls="inputs",
        )
        + "</details>"
    )
    return "".join(parts)


def _resource(name: str, amount: float) -> str:
    if "memory" in name:
        return f"{name} {amount / 2**30:.1f} GiB"
    return f"{name} {amount:g}"


def _resources(record: Mapping[str, Any], trials: Sequence[TrialRow]) -> str:
    sessions = record.get("sessions", [])
    known = [s["wall_time_s"] for s in sessions if s.get("wall_time_s") is not None]
    res = record.get("resources", {})
    gpus = res.get("gpus_per_worker", 0)
    trial_time = sum(float(t.last.get("time_total_s", 0.0)) for t in trials)
    cluster = record.get("cluster", {})
    parts = [
        "<dl>",
        f"<dt>wall time</dt><dd>{_duration(sum(known)) if known else '-'} "
        f"over {len(sessions)} session(s) (tuning and export)</dd>",
        f"<dt>trial time</dt><dd>{_duration(trial_time)} summed over trials "
        f"({record.get('settings', {}).get('max_concurrent', '?')} at a time)</dd>",
        f"<dt>per trial</dt><dd>{res.get('workers', '?')} worker(s) x "
        f"{res.get('cpus_per_worker', '?')} CPU"
        + (f" + {gpus:g} GPU" if gpus else " (CPU, gloo)")
        + "</dd>",
        "<dt>Ray cluster</dt><dd>"
        + (", ".join(_resource(k, v) for k, v in sorted(cluster.items())) or "-")
        + "</dd>",
        "<dt>versions</dt><dd>"
        + _esc(", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items()) or "-")
        + "</dd>",
        "</dl>",
        _table(
            ["session started", "host", "wall time", "command"],
            [
                [
                    _when(s.get("started")),
                    s.get("host", "?"),
                    _duration(s.get("wall_time_s")),
                    " ".join(s.get("command", [])),
                ]
                for s in sessions
            ],
            cls="sessions",
        ),
    ]
    return "".join(parts)


# --------------------------------------------------------------------------- the report


def build_report(record: Mapping[str, Any], *, optuna_storage: str | None = None) -> str:
    """The HTML text of a run's report.

    Args:
        record: the run record (ctray.tune.run_record).
        optuna_storage: the study's URL when the record's is redacted (it held a password).
    """
    spec = get_family(record["family"])
    stage = spec.stage(record["stage"])
    metric = f"val/{stage.metric}"
    keys = [metric, *(f"val/{m}" for m, _ in stage.objectives)]
    baseline = f"val/{spec.baselines[0]}_{stage.metric}" if spec.baselines else None
    settings = record.get("settings", {})
    trials = rank_trials(
        load_trials(
            record["run_path"],
            max_epochs=int(settings["epochs"]),
            keys=[*keys, *([baseline] if baseline else [])],
        ),
        metric,
        stage.mode,
    )
    best_id = record.get("best_trial") or next(
        (t.trial_id for t in trials if math.isfinite(float(t.last.get(metric, math.nan)))), None
    )
    best = next((t for t in trials if t.trial_id == best_id), None)
    optuna_info = record.get("optuna", {})
    url = optuna_storage or optuna_info.get("storage")
    title = f"{record['experiment']}: {spec.name}" + (
        f" stage {stage.name}" if len(spec.stages) > 1 else ""
    )
    started = (record.get("sessions") or [{}])[0].get("started")
    header = (
        f"<h1>{_esc(title)}</h1>"
        f'<p class="muted">{_esc(spec.description)}</p><dl>'
        f"<dt>tuned</dt><dd><code>{_esc(metric)}</code> ({stage.mode})"
        + "".join(f", <code>val/{_esc(m)}</code> ({md})" for m, md in stage.objectives)
        + f"</dd><dt>search</dt><dd>{settings.get('num_samples', '?')} trials x "
        f"{settings.get('epochs', '?')} epochs, Optuna TPE + ASHA (grace "
        f"{settings.get('grace_period', '?')} epochs after warm-up, reduction factor "
        f"{settings.get('reduction_factor', '?')})</dd>"
        f"<dt>run folder</dt><dd><code>{_esc(record['run_path'])}</code> "
        f"(TensorBoard: <code>tensorboard --logdir {_esc(record['run_path'])}</code>)</dd>"
        f"<dt>export</dt><dd><code>{_esc(record.get('export') or '-')}</code></dd>"
        f"<dt>started</dt><dd>{_when(started)}</dd></dl>"
    )
    sections = [
        _section("Trials (best first)", lambda: _trials_table(trials, keys, best_id)),
        _section("Validation curves", lambda: _curves(trials, keys, baseline, best_id)),
    ]
    if stage.objectives:
        sections.append(_section("Objectives", lambda: _pareto(trials, stage)))
    sections += [
        _section("Best model beside its baselines", lambda: _baselines(spec, best)),
        _section("Best model: montage", lambda: _montage(record)),
        _section("Optuna study and parameter importances", lambda: _study(optuna_info, url, stage)),
        _section("Data", lambda: _manifest(record["data_dir"])),
        _section("Wall time and resources", lambda: _resources(record, trials)),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>\n"
        + header
        + "".join(sections)
        + f'<p class="muted">Written by ctray on {_when(time.time())}; regenerate with '
        f"<code>ctray report DIR</code>.</p></body></html>\n"
    )


def _write(path: Path, data: bytes) -> Path:
    """Atomically, readable by everyone like any other file of the run (a page to share)."""
    atomic_write_bytes(path, data).chmod(0o644)
    return path


def write_report(
    directory: str | Path,
    *,
    out: str | Path | None = None,
    optuna_storage: str | None = None,
    display_window: str | None = None,
) -> Path:
    """Build the report of the run whose record is in ``directory``; write it to ``out``
    (default ``directory/report.html``) and return that path."""
    record = read_record(directory)
    if display_window:
        record = {**record, "display_window": display_window}
    text = build_report(record, optuna_storage=optuna_storage)
    return _write(Path(out) if out else Path(directory) / REPORT, text.encode())


def publish_report(
    record: dict[str, Any], directory: Path, *, export: Path, optuna_storage: str | None
) -> Path:
    """Write the record and ``report.html`` into ``directory`` (the run folder, or the export
    for a remote storage) and a copy of the report beside the exported model; returns the
    report's path. ``optuna_storage``: the study URL unredacted."""
    from ctray.tune.run_record import write_record

    write_record(directory, record)
    text = build_report(record, optuna_storage=optuna_storage).encode()
    path = _write(directory / REPORT, text)
    if export.resolve() != directory.resolve():
        _write(export / REPORT, text)
    return path
