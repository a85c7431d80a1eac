"""The shared body of the `experiments/tune_<family>.py` scripts and `ctray tune`.

Data in, exported best model out: build (or reuse) shards, start or join Ray, run Tune,
print the trials and the best configuration, export the best model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctray.config import ConfigError
from ctray.data.build import BuildConfig, BuildError
from ctray.data.nifti import NiftiError
from ctray.data.shards import MANIFEST
from ctray.registry import get_family
from ctray.train.trainer import Resources
from ctray.tune.search_space import load_search_space

log = logging.getLogger("ctray")

# Faults in what a user typed or pointed at: a one-line message and exit code 2, no traceback.
USER_ERRORS = (ConfigError, BuildError, NiftiError, FileNotFoundError, KeyError, ValueError)


def report_user_error(err: Exception) -> int:
    """Print ``err`` as one line on stderr (KeyError without its quotes); returns exit code 2."""
    print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
    return 2


@dataclass(frozen=True, kw_only=True)
class ExperimentDefaults:
    """What a script runs with no arguments (and with --smoke-test)."""

    phantom: int = 8
    patch_size: tuple[int, int, int] = (32, 32, 32)
    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)
    patches_per_subject: int = 6
    num_samples: int = 4
    epochs: int = 6
    batch_size: int = 4
    max_train_batches: int | None = None
    max_val_batches: int | None = None
    preset: str | None = None
    family_options: tuple[tuple[str, Any], ...] = ()
    # Per-stage epochs of a staged family, e.g. (("autoencoder", 6), ("diffusion", 10)).
    stage_epochs: tuple[tuple[str, int], ...] = ()
    # Per-stage trial counts, e.g. (("tokenizer", 4), ("maskgit", 2)).
    stage_samples: tuple[tuple[str, int], ...] = ()
    # Display window of the montages (TensorBoard, report.html): soft_tissue, lung, bone, L/W.
    display_window: str = "soft_tissue"


def add_data_arguments(parser: argparse.ArgumentParser, family: str | None) -> None:
    """Shard-building flags shared by `ctray data build` and the tune scripts."""
    g = parser.add_argument_group("data")
    g.add_argument("--phantom", type=int, help="number of phantom demo subjects")
    g.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    g.add_argument(
        "--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="target voxel size, mm"
    )
    g.add_argument(
        "--window",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=(-1000.0, 1000.0),
        help="HU window mapped to [0, 1]",
    )
    g.add_argument("--patches-per-subject", type=int)
    g.add_argument("--val-fraction", type=float, default=0.25)
    g.add_argument(
        "--strict",
        action="store_true",
        help="fail on the first unusable input instead of skipping it",
    )
    g.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{family or 'family'} data option (repeatable), e.g. simulations=4",
    )


def build_config(args: argparse.Namespace, defaults: ExperimentDefaults) -> BuildConfig:
    return BuildConfig(
        patch_size=tuple(args.patch_size or defaults.patch_size),
        spacing=tuple(args.spacing or defaults.spacing),
        window_lo=args.window[0],
        window_hi=args.window[1],
        patches_per_subject=args.patches_per_subject or defaults.patches_per_subject,
        val_fraction=args.val_fraction,
        seed=args.seed,
        strict=args.strict,
    )


def add_arguments(parser: argparse.ArgumentParser, family: str) -> None:
    """The flags every tune script shares."""
    spec = get_family(family)
    parser.add_argument(
        "--data",
        help="NIfTI input folder (see `ctray data build`) or a shard folder; default: phantom",
    )
    add_data_arguments(parser, family)
    g = parser.add_argument_group("search")
    g.add_argument(
        "--search-space",
        default=family,
        help=f"YAML file or family name (default: search_spaces/{family}.yaml)",
    )
    g.add_argument(
        "--preset",
        help=f"base preset overriding the search space's ({', '.join(sorted(spec.presets))})",
    )
    if len(spec.stages) > 1:
        names = spec.stage_names()
        g.add_argument(
            "--stage",
            default="all",
            choices=["all", *names],
            help=f"stage to tune (default: all, in order {' -> '.join(names)})",
        )
        g.add_argument(
            "--init-from",
            metavar="DIR",
            help="exported model of the stage before --stage (its modules are used frozen)",
        )
    g.add_argument("--num-samples", type=int)
    g.add_argument("--epochs", type=int, help="epochs of every stage (default: per preset)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--accumulate", type=int, help="micro-batches per optimiser step")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (default: the stage's)")
    g.add_argument("--val-every", type=int, help="validate every N epochs (default: the stage's)")
    g.add_argument("--max-concurrent", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("cluster")
    g.add_argument(
        "--address", help="existing Ray cluster (e.g. auto); default: a local Ray session"
    )
    g.add_argument(
        "--workers-per-trial", type=int, default=1, help="Ray Train workers (DDP ranks) per trial"
    )
    g.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        help="0 = CPU/gloo; 1 = one GPU per worker (NCCL, bf16)",
    )
    g.add_argument("--cpus-per-worker", type=float, default=1.0)
    g = parser.add_argument_group("output")
    g.add_argument(
        "--storage",
        default="runs",
        help="Tune/Train storage: local path or s3://... (shared on a cluster)",
    )
    g.add_argument(
        "--name", help="experiment name (default: <family>-<time>; --resume picks the latest)"
    )
    g.add_argument("--export", default="exported", help="folder the best model is exported into")
    g.add_argument(
        "--optuna-storage",
        metavar="URL",
        help="Optuna storage (SQLAlchemy URL, e.g. postgresql://...) for the study, named like "
        "the experiment; default: SQLite in the run folder (<storage>/<name>/optuna.db)",
    )
    g.add_argument(
        "--display-window",
        help="HU display window of the montages in TensorBoard and report.html: soft_tissue "
        "(W400 L40), lung, bone or LEVEL/WIDTH (default: the family's, soft_tissue)",
    )
    g.add_argument(
        "--serve",
        action="store_true",
        help="after export, host the best model with Ray Serve (token: $CTRAY_SERVE_TOKEN)",
    )
    g.add_argument("--serve-port", type=int, default=8000)
    g.add_argument(
        "--shards-dir",
        default="runs/data",
        help="where shards built from --data/--phantom go (on a cluster: a shared mount)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="resume an interrupted experiment; finished trials are not re-run",
    )
    g.add_argument(
        "--smoke-test", action="store_true", help="tiny, fast run that exercises every stage"
    )


def parse_options(raw: list[str], base: tuple[tuple[str, Any], ...] = ()) -> dict[str, Any]:
    """``KEY=VALUE`` flags to a dict; JSON values are decoded, ``*phases`` split on commas."""
    out: dict[str, Any] = dict(base)
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        parsed: Any = (
            json.loads(value)
            if value[:1] in "[{0123456789-" or value in ("true", "false")
            else value
        )
        if key.endswith("phases") and isinstance(parsed, str):
            parsed = [p for p in parsed.split(",") if p]
        out[key] = parsed
    return out


def prepare_data(args: argparse.Namespace, family: str, defaults: ExperimentDefaults) -> Path:
    """A shard folder for the run: given, built from --data, or built from phantoms."""
    spec = get_family(family)
    if args.data and (Path(args.data) / MANIFEST).is_file():
        return Path(args.data)
    config = build_config(args, defaults)
    options = parse_options(args.option, defaults.family_options)
    phantom = 0 if args.data else (args.phantom or defaults.phantom)
    source = str(Path(args.data).resolve()) if args.data else f"phantom{phantom}"
    key = hashlib.sha256(
        json.dumps([source, repr(config), options], sort_keys=True).encode()
    ).hexdigest()[:10]
    # Named by the family whose builder it is: families sharing a builder share the shards.
    out = Path(args.shards_dir) / f"{spec.shards_family}-{key}"
    print(f"building {spec.shards_family} shards from {source} into {out}", flush=True)
    manifest = spec.build_shards(
        out=out, inputs=args.data, phantom=phantom, config=config, options=options
    )
    report_build(manifest)
    return out


def report_build(manifest: Any) -> None:
    """Print row counts and every skipped input with its reason."""
    print(f"shards: {manifest.counts} rows, {len(manifest.skipped)} skipped input(s)", flush=True)
    for s in manifest.skipped:
        print(f"  skipped {s['path']}: {s['reason']}", flush=True)


def run(
    family: str,
    argv: list[str] | None = None,
    *,
    defaults: ExperimentDefaults = ExperimentDefaults(),
    smoke: ExperimentDefaults | None = None,
) -> int:
    """Parse arguments and run the experiment; returns a process exit code."""
    parser = argparse.ArgumentParser(
        prog=f"tune_{family}.py",
        description=f"Tune the {family} family with Ray Tune + Optuna and export the best model.",
    )
    add_arguments(parser, family)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.smoke_test and smoke is not None:
        defaults = smoke
    try:
        return _run(family, args, defaults)
    except USER_ERRORS as err:
        return report_user_error(err)


def _run(family: str, args: argparse.Namespace, defaults: ExperimentDefaults) -> int:
    from ctray.session import init_ray
    from ctray.train.montage import display_window
    from ctray.tune.runner import TuneSettings, default_name, latest_experiment

    started = time.perf_counter()
    spec = get_family(family)
    serving = None
    if args.serve:  # checked now, not after the tune (a bad token must not cost a search)
        from ctray.serve.config import ServeConfig, token_from

        serving = ServeConfig(
            models=Path(args.export), port=args.serve_port, token=token_from(None)
        )
    space = load_search_space(args.search_space)
    if space.family != family:
        raise ConfigError(f"{space.source} is a {space.family!r} search space, not {family!r}")
    preset = args.preset or defaults.preset
    if preset:
        space = dataclasses.replace(space, base={**space.base, **spec.preset(preset)})
    resources = Resources(
        workers=args.workers_per_trial,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
    )
    window = args.display_window or defaults.display_window
    display_window(window)  # a bad value fails now, not in every trial
    settings = TuneSettings(
        num_samples=args.num_samples or defaults.num_samples,
        epochs=args.epochs or defaults.epochs,
        batch_size=args.batch_size or defaults.batch_size,
        max_train_batches=defaults.max_train_batches,
        max_val_batches=defaults.max_val_batches,
        max_concurrent=args.max_concurrent,
        seed=args.seed,
        accumulate=args.accumulate,
        grad_clip=args.grad_clip,
        val_every=args.val_every,
        display_window=window,
    )
    stage_arg = getattr(args, "stage", None)
    stages = spec.stage_names() if stage_arg in (None, "all") else [stage_arg]
    init_from = getattr(args, "init_from", None)
    if init_from and stage_arg in (None, "all"):
        raise ConfigError("--init-from needs --stage (the stage that trains on that export)")
    name = args.name
    if args.resume and not name:
        name = latest_experiment(args.storage, family, spec.stage_names())
        if not name:
            raise FileNotFoundError(f"{args.storage}: no {family} experiment to resume")
    name = name or default_name(family)
    if args.resume:
        _check_resumable(args, spec, name, stages)
    data_dir = prepare_data(args, family, defaults)
    init_ray(args.address)
    path = None
    for stage in stages:
        epochs = args.epochs or dict(defaults.stage_epochs).get(stage, settings.epochs)
        samples = args.num_samples or dict(defaults.stage_samples).get(stage, settings.num_samples)
        path = _tune_stage(
            args,
            spec=spec,
            space=space,
            stage=stage,
            name=name,
            data_dir=data_dir,
            settings=dataclasses.replace(settings, epochs=epochs, num_samples=samples),
            resources=resources,
            init_from=init_from,
        )
        init_from = str(path)
    print(f"serve it with: ctray serve --models {Path(args.export)}")
    print(f"total wall time: {time.perf_counter() - started:.0f} s")
    if serving is not None:
        from ctray.serve.server import serve_forever

        return serve_forever(dataclasses.replace(serving, models=path), address=args.address)
    return 0


def _stage_run(
    args: argparse.Namespace, spec: Any, name: str, stage: str
) -> tuple[str, Path, bool]:
    """A stage's Tune run name, its export path, and whether --resume reuses that export.

    A staged family's earlier stages export to ``EXPORT/<name>-<stage>``; the last stage (the
    servable model) to ``EXPORT/<name>``. With --resume, an earlier stage already exported is
    reused, not re-run.
    """
    final = stage == spec.final.name
    run_name = f"{name}-{stage}" if len(spec.stages) > 1 else name
    out = Path(args.export) / (name if final else run_name)
    return run_name, out, bool(args.resume and not final and (out / "model.json").is_file())


def _check_resumable(args: argparse.Namespace, spec: Any, name: str, stages: list[str]) -> None:
    """Refuse a damaged experiment state before any data is built or Ray is started."""
    from ctray.tune.runner import check_experiment_state

    for stage in stages:
        run_name, _, reused = _stage_run(args, spec, name, stage)
        run = Path(args.storage) / run_name
        if not reused and run.exists():
            check_experiment_state(str(run))


def _tune_stage(
    args: argparse.Namespace,
    *,
    spec: Any,
    space: Any,
    stage: str,
    name: str,
    data_dir: Path,
    settings: Any,
    resources: Resources,
    init_from: str | None,
) -> Path:
    """Tune one stage and export its best trial (see :func:`_stage_run`); returns its path."""
    from ctray.tune.export import PARETO_FILE, export_best, format_pareto, report_files
    from ctray.tune.runner import format_table, run_tune, summary_rows

    staged = len(spec.stages) > 1
    run_name, out, reused = _stage_run(args, spec, name, stage)
    if reused:
        print(f"stage {stage}: reusing its export {out}", flush=True)
        return out
    storage_run = Path(args.storage) / run_name
    resume = args.resume and storage_run.exists()
    record, study_url = _begin_record(
        args,
        spec=spec,
        stage=stage,
        run_name=run_name,
        resume=resume,
        data_dir=data_dir,
        settings=settings,
        resources=resources,
        init_from=init_from,
    )
    print(
        f"tuning {spec.name}{f' stage {stage}' if staged else ''}: experiment {run_name}, "
        f"{settings.num_samples} trials x {settings.epochs} epochs, "
        f"{resources.workers} worker(s)/trial, {'GPU' if resources.use_gpu else 'CPU'}"
        + (f", on {init_from}" if init_from else ""),
        flush=True,
    )
    grid = run_tune(
        space=space,
        data_dir=data_dir,
        storage_path=args.storage,
        name=run_name,
        settings=settings,
        resources=resources,
        resume=resume,
        stage=stage,
        init_from=init_from,
        optuna_storage=None if resume else study_url,
    )
    print("\ntrials (best first):")
    print(format_table(summary_rows(grid, spec.name, stage)))
    path, metrics = export_best(grid, spec.name, out, experiment=run_name, stage=stage)
    if (path / PARETO_FILE).is_file():
        front = format_pareto(json.loads((path / PARETO_FILE).read_text()))
        print(f"\nPareto front (last validation of each trial; {path / PARETO_FILE}):\n{front}")
    best_cfg = json.loads((path / "model.json").read_text())["source"]["config"]
    print(f"\nbest configuration: {json.dumps(best_cfg, sort_keys=True)}")
    files = report_files(metrics, spec.baselines)
    if files and files["report.txt"].strip() != "(no metric with a baseline)":
        print(f"validation of the best model beside its baselines:\n{files['report.txt']}", end="")
    else:
        val = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val/")}
        print(f"best validation metrics: {val}")
    print(f"exported best {stage} model to {path}", flush=True)
    _publish_report(args, record, run_name=run_name, export=path, metrics=metrics, study=study_url)
    return path


def _begin_record(
    args: argparse.Namespace,
    *,
    spec: Any,
    stage: str,
    run_name: str,
    resume: bool,
    data_dir: Path,
    settings: Any,
    resources: Resources,
    init_from: str | None,
) -> tuple[dict[str, Any], str | None]:
    """The run record of a stage (ctray.tune.run_record) and the Optuna study's URL: the
    --optuna-storage URL, else an SQLite file in a local run folder, else (remote storage)
    None, an in-memory study."""
    from ctray.tune.run_record import begin_record, local_run_dir
    from ctray.tune.study import default_storage_url, redact

    run_dir = local_run_dir(args.storage, run_name)
    url = args.optuna_storage or (default_storage_url(run_dir) if run_dir else None)
    if url is None:
        print("Optuna study: in memory (give --optuna-storage URL to keep it)", flush=True)
    elif not resume:
        print(f"Optuna study {run_name!r} in {redact(url)}", flush=True)
    record = begin_record(
        run_dir,
        resume=resume,
        family=spec.name,
        stage=stage,
        experiment=run_name,
        run_path=str(run_dir) if run_dir else f"{args.storage.rstrip('/')}/{run_name}",
        data_dir=str(Path(data_dir).resolve()),
        init_from=init_from,
        settings=dataclasses.asdict(settings),
        resources=dataclasses.asdict(resources),
        display_window=settings.display_window,
        optuna={"storage": redact(url) if url else None, "study_name": run_name},
    )
    # A resumed run keeps its study (Tune restores the searcher with its storage).
    return record, args.optuna_storage or record.get("optuna", {}).get("storage")


def _publish_report(
    args: argparse.Namespace,
    record: dict[str, Any],
    *,
    run_name: str,
    export: Path,
    metrics: dict[str, Any],
    study: str | None,
) -> None:
    """Write report.html into the run folder (or, for a remote storage, the export) and a
    copy beside the exported model."""
    from ctray.tune.html_report import publish_report
    from ctray.tune.run_record import finish_session, local_run_dir

    record = finish_session(
        record, export=str(export.absolute()), best_trial=metrics.get("trial_id")
    )
    home = local_run_dir(args.storage, run_name) or export
    path = publish_report(record, home, export=export, optuna_storage=study)
    print(f"report: {path} (regenerate: ctray report {home})", flush=True)
