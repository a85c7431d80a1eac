"""Ray Tune + Optuna (TPE) + ASHA over Ray Train runs of any family.

Ray 2.60 runs Train V2, where a Trainer cannot be handed to a Tuner; each trial is a small
driver function that builds a TorchTrainer and forwards its reports to Tune through
``TuneReportCallback`` (whose metrics carry the latest ``checkpoint_path``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import pickletools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.data
from ray import tune
from ray.tune import ResultGrid
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from ctray.config import field_names, from_dict
from ctray.data.shards import load_manifest
from ctray.modeldir import read_meta
from ctray.registry import FamilySpec, Stage, get_family
from ctray.train.loop import LoopConfig
from ctray.train.trainer import (
    MATERIALIZE_SHARE,
    Resources,
    choose_data_path,
    column_bytes,
    datasets,
    make_trainer,
    object_store_bytes,
)
from ctray.tune.search_space import SearchSpace
from ctray.tune.study import StudySearch, check_new_study, open_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TuneSettings:
    """How a search runs.

    Attributes:
        num_samples: trials Optuna proposes.
        epochs / batch_size / max_*_batches: passed to the generic loop of every trial.
        max_concurrent: trials running at once.
        grace_period / reduction_factor: ASHA early stopping (epochs before a trial can be
            stopped; keep 1/reduction_factor of trials per rung).
        seed: seeds the TPE sampler and every trial's loop.
        max_failures: Train-level retries of a failed worker group (resumes from checkpoint).
        trial_cpus: CPU slots of each trial's driver function (it only waits on its trainer).
        accumulate / grad_clip / val_every: loop settings; None takes the stage's default.
        display_window: TensorBoard montages' display window (see ctray.train.montage).
        materialize_share: the shards are read once into the object store when their columns
            take at most this share of it, and streamed from Parquet every epoch otherwise.
    """

    num_samples: int = 4
    epochs: int = 6
    batch_size: int = 4
    max_train_batches: int | None = None
    max_val_batches: int | None = None
    max_concurrent: int = 2
    grace_period: int = 2
    reduction_factor: int = 2
    seed: int = 0
    max_failures: int = 1
    trial_cpus: float = 0.25
    accumulate: int | None = None
    grad_clip: float | None = None
    val_every: int | None = None
    display_window: str = "soft_tissue"
    materialize_share: float = MATERIALIZE_SHARE


def metric_name(family: str, stage: str | None = None) -> str:
    spec = get_family(family)
    return f"val/{(spec.stage(stage) if stage else spec.final).metric}"


def data_bound_options(spec: FamilySpec, build: dict[str, Any]) -> dict[str, Any]:
    """Data options the shards were built with that are also model settings (e.g. an X-ray
    geometry, a slice factor): the model must use the shards' values, so they override the
    search space's base."""
    fields = set(field_names(spec.config_cls))
    return {k: v for k, v in (build.get("family_options") or {}).items() if k in fields}


def grace_epochs(stage: Stage, base_config: Any, settings: TuneSettings) -> int:
    """Epochs before ASHA may stop a trial: the stage's warm-up plus ``grace_period`` epochs of
    real training (a trial judged during a pre-training phase is judged on nothing)."""
    return min(stage.warmup_epochs(base_config) + settings.grace_period, settings.epochs)


def asha_args(stage: Stage, base_config: Any, settings: TuneSettings) -> dict[str, Any]:
    """ASHAScheduler's settings of every search (``benchmarks/bench_hpo.py`` measures them):
    progress counted in reported epochs, judged first after :func:`grace_epochs`."""
    return {
        "time_attr": "epochs_done",
        "max_t": settings.epochs,
        "grace_period": grace_epochs(stage, base_config, settings),
        "reduction_factor": settings.reduction_factor,
    }


def loop_settings(trained: Stage, settings: TuneSettings, **fixed: Any) -> dict[str, Any]:
    """The LoopConfig dict of every trial: the stage's defaults, then explicit settings."""
    loop = {**dict(trained.loop_defaults), **fixed}
    for key in ("accumulate", "grad_clip", "val_every"):
        if getattr(settings, key) is not None:
            loop[key] = getattr(settings, key)
    return loop


def _run_trial(
    config: dict[str, Any],
    *,
    family: str,
    base: dict[str, Any],
    loop: dict[str, Any],
    data_dir: str,
    resources: Resources,
    train_storage: str,
    prepared: dict[str, ray.data.Dataset],
    max_failures: int,
) -> None:
    """One trial: a TorchTrainer with the sampled config; resumes if its run already exists."""
    spec = get_family(family)
    context = tune.get_context()
    family_cfg = from_dict(spec.config_cls, {**base, **config}, where="trial config")
    loop_cfg = from_dict(
        LoopConfig,
        {**loop, "tensorboard_dir": str(Path(context.get_trial_dir()) / "tensorboard")},
        where="loop config",
    )
    trainer = make_trainer(
        spec=spec,
        loop=loop_cfg,
        family_config=family_cfg,
        data_dir=data_dir,
        resources=resources,
        storage_path=train_storage,
        name=context.get_trial_id(),
        max_failures=max_failures,
        callbacks=[TuneReportCallback()],
        prepared=prepared,
    )
    trainer.fit()


def _storage(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run_tune(
    *,
    space: SearchSpace,
    data_dir: str | Path,
    storage_path: str,
    name: str,
    settings: TuneSettings = TuneSettings(),
    resources: Resources = Resources(),
    resume: bool = False,
    stage: str | None = None,
    init_from: str | Path | None = None,
    optuna_storage: str | None = None,
) -> ResultGrid:
    """Run (or resume) a search of one stage; returns Tune's ResultGrid.

    A stage after the first trains on the frozen modules of ``init_from`` (an export of the
    stage before it), whose family config fixes every setting the search does not sample.
    ``optuna_storage`` (an RDB URL) keeps the Optuna study there as study ``name`` (see
    ctray.tune.study; None: in memory); a resumed search keeps the study it started with.
    """
    spec = space.spec
    trained = spec.stage(stage) if stage else spec.stage(None)
    space = space.for_stage(trained.name) if space.stage_params else space
    storage = _storage(storage_path)
    data_dir = str(Path(data_dir).resolve())
    manifest = load_manifest(data_dir)
    base = dict(space.base)
    if init_from is not None:
        init_from = str(Path(init_from).resolve())
        base = {**base, **read_meta(init_from)["family_config"]}
    elif spec.frozen_modules(trained):
        raise ValueError(
            f"stage {trained.name!r} of {spec.name} needs the export of the stage before it "
            "(--init-from DIR), or run every stage in sequence (--stage all)"
        )
    bound = data_bound_options(spec, manifest.build)
    fixed = sorted(set(space.params) & set(bound))
    if fixed:
        raise ValueError(
            f"{space.source}: {', '.join(fixed)} are fixed by the shards (built with "
            f"{', '.join(f'{k}={bound[k]}' for k in fixed)}); remove them from the search space "
            "or rebuild the shards with other --option values"
        )
    base = {**base, **bound}
    data_path = choose_data_path(
        column_bytes(manifest, spec.columns), object_store_bytes(), settings.materialize_share
    )
    log.info("%s: %s", data_dir, data_path.describe())
    prepared = datasets(
        spec, data_dir, manifest, materialize=data_path.materialize, seed=settings.seed
    )
    loop = loop_settings(
        trained,
        settings,
        family=spec.name,
        stage=trained.name,
        init_from=init_from,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        seed=settings.seed,
        max_train_batches=settings.max_train_batches,
        max_val_batches=settings.max_val_batches,
        display_window=settings.display_window,
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_trial,
            family=spec.name,
            base=base,
            loop=loop,
            data_dir=data_dir,
            resources=resources,
            train_storage=f"{storage}/{name}-train",
            prepared=prepared,
            max_failures=settings.max_failures,
        ),
        {"cpu": settings.trial_cpus},
    )
    path = f"{storage}/{name}"
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"{path}: no experiment to resume")
        check_experiment_state(path)
        tuner = tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
        return tuner.fit()
    metric = f"val/{trained.metric}"
    points = {"points_to_evaluate": space.points} if space.points else {}
    base_cfg = from_dict(spec.config_cls, base, where="search space base")
    scheduler_args = asha_args(trained, base_cfg, settings)
    # Trials that stop before max_t were stopped by ASHA: the study records them as pruned.
    study: dict[str, Any] = {k: scheduler_args[k] for k in ("time_attr", "max_t")}
    study["num_samples"] = settings.num_samples
    if optuna_storage:
        rdb = open_storage(optuna_storage)
        check_new_study(rdb, name, optuna_storage)
        study.update(storage=rdb, study_name=name)
    if trained.objectives:
        # Multi-objective: Optuna gets every objective (its TPE sampler handles several);
        # metric/mode then go to the scheduler itself, not to TuneConfig (Ray refuses both a
        # searcher and TuneConfig setting them), and ASHA stops trials on the primary one.
        objectives = [(metric, trained.mode)] + [(f"val/{m}", md) for m, md in trained.objectives]
        searcher = StudySearch(
            metric=[m for m, _ in objectives],
            mode=[md for _, md in objectives],
            seed=settings.seed,
            **points,
            **study,
        )
        scheduler = ASHAScheduler(metric=metric, mode=trained.mode, **scheduler_args)
        target: dict[str, Any] = {}
    else:
        searcher = StudySearch(
            metric=metric, mode=trained.mode, seed=settings.seed, **points, **study
        )
        scheduler = ASHAScheduler(**scheduler_args)
        target = {"metric": metric, "mode": trained.mode}
    tuner = tune.Tuner(
        trainable,
        param_space=space.tune_space(),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent),
            scheduler=scheduler,
            num_samples=settings.num_samples,
            **target,
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
    )
    return tuner.fit()


def latest_experiment(
    storage_path: str, family: str, stages: list[str] | None = None
) -> str | None:
    """Name of the newest experiment of ``family`` under a local storage path (for --resume).

    A staged family's Tune runs are called ``<name>-<stage>``; the stage suffix is removed.
    """
    root = Path(_storage(storage_path))
    found = sorted(
        (p for p in root.glob(f"{family}-*") if p.is_dir() and not p.name.endswith("-train")),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        return None
    name = found[-1].name
    for stage in stages if stages and len(stages) > 1 else []:
        name = name.removesuffix(f"-{stage}")
    return name


def default_name(family: str) -> str:
    return f"{family}-{time.strftime('%Y%m%d-%H%M%S')}"


def summary_rows(grid: ResultGrid, family: str, stage: str | None = None) -> list[dict[str, Any]]:
    """One row per trial: id, status, epochs, the metric beside each baseline's, sampled params."""
    spec = get_family(family)
    trained = spec.stage(stage) if stage else spec.final
    metric = f"val/{trained.metric}"
    baselines = [f"val/{b}_{trained.metric}" for b in spec.baselines]
    objectives = [f"val/{m}" for m, _ in trained.objectives]
    rows = []
    for result in grid:
        m = result.metrics or {}
        rows.append(
            {
                "trial": m.get("trial_id", "?"),
                "status": "error" if result.error else "ok",
                "epochs": m.get("epochs_done", 0),
                metric: m.get(metric, math.nan),
                **{o: m.get(o, math.nan) for o in objectives},
                **{b: m.get(b, math.nan) for b in baselines if b in m},
                **{k: v for k, v in (result.config or {}).items()},
            }
        )
    spec_mode = trained.mode
    rows.sort(
        key=lambda r: (math.isnan(r[metric]), r[metric] if spec_mode == "min" else -r[metric])
    )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of summary rows."""
    if not rows:
        return "(no trials)"
    keys = list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = {k: max(len(k), *(len(cell(r.get(k, ""))) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(cell(r.get(k, "")).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


class ExperimentStateError(ValueError):
    """A Tune experiment folder whose saved state cannot be read back, so it cannot resume."""


# What Tuner.restore reads (Ray 2.60's names; search_gen_state is a pickle despite its
# suffix): the newest file of each pattern, by name, as Ray picks it. Every Tune session (a
# run, each resume) writes the last three anew, named by the session's start time.
STATE_FILES = (
    ("tuner.pkl", "pickle"),
    ("experiment_state-*.json", "json"),
    ("searcher-state-*.pkl", "pickle"),
    ("search_gen_state-*.json", "pickle"),
)
SESSION_FILES = STATE_FILES[1:]


def _damage(data: bytes, kind: str) -> str | None:
    """Why ``data`` is not a whole file of ``kind`` (None: it is). Pickles are only walked
    opcode by opcode (pickletools), never loaded, so checking runs no code."""
    if not data.strip():
        return "empty"
    try:
        if kind == "json":
            json.loads(data)
        else:
            for _ in pickletools.genops(data):
                pass
    except ValueError as err:  # JSONDecodeError and truncated pickles are ValueErrors
        return f"truncated or corrupted ({err})"
    return None


def _session(name: str, pattern: str) -> str:
    """The session (start time) in the name of a state file of ``pattern``."""
    head, tail = pattern.split("*")
    return name[len(head) : len(name) - len(tail)]


def check_experiment_state(path: str) -> None:
    """Read back every file ``Tuner.restore`` needs from the experiment folder ``path``.

    Ray fails on a damaged one with a bare ``EOFError`` or ``JSONDecodeError`` (e.g. an empty
    tuner.pkl after a crash: ray-project/ray#58179); this names the file and the ways forward.

    Raises:
        ExperimentStateError: a state file is missing, empty, truncated or corrupted.
    """
    fs, root = pyarrow.fs.FileSystem.from_uri(_storage(path))
    names = sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(root)))

    def damage(name: str, kind: str) -> str | None:
        with fs.open_input_stream(f"{root}/{name}") as f:
            return _damage(f.readall(), kind)

    for pattern, kind in STATE_FILES:
        matching = [n for n in names if fnmatch.fnmatch(n, pattern)]
        found = damage(matching[-1], kind) if matching else "missing"
        if found is not None:
            file = f"{root}/{matching[-1] if matching else pattern}"
            earlier = _earlier_session(names, damage) if pattern != "tuner.pkl" else None
            raise ExperimentStateError(_way_forward(path, file, found, earlier))


def _earlier_session(
    names: list[str], damage: Callable[[str, str], str | None]
) -> tuple[str, list[str]] | None:
    """The session before the last and the last one's files, if that earlier session's state
    files are all there and whole (Tune can then resume from them)."""

    def files(session: str) -> list[tuple[str, str]]:
        return [
            (n, kind)
            for pattern, kind in SESSION_FILES
            for n in names
            if fnmatch.fnmatch(n, pattern) and _session(n, pattern) == session
        ]

    pattern = SESSION_FILES[0][0]
    sessions = sorted({_session(n, pattern) for n in names if fnmatch.fnmatch(n, pattern)})
    if len(sessions) < 2:
        return None
    earlier = files(sessions[-2])
    if len(earlier) != len(SESSION_FILES) or any(damage(n, k) for n, k in earlier):
        return None
    return sessions[-2], [n for n, _ in files(sessions[-1])]


def _way_forward(run: str, file: str, problem: str, earlier: tuple[str, list[str]] | None) -> str:
    lines = [
        f"cannot resume {run}: {file} is {problem}, and Ray Tune restores an experiment from it.",
        f"  start again: rerun without --resume under another --name (or remove {run});",
    ]
    if earlier:
        session, latest = earlier
        lines.append(
            f"  or resume from the trial checkpoints: move the last session's files "
            f"({', '.join(latest)}) out of {run} and rerun with --resume; Tune then restores "
            f"the search as its session {session} saved it, and every unfinished trial "
            f"continues from its own latest checkpoint in {run}-train/."
        )
    else:
        lines.append(
            f"  the trials' own checkpoints stay in {run}-train/<trial>/checkpoint_*/ "
            "(state.pt, train_config.json), but Tune cannot continue this search: there is no "
            "earlier intact copy of its state."
        )
    return "\n".join(lines)
