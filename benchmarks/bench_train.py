"""Training throughput: ``ctray.train`` (Ray Train) vs a bare PyTorch loop on the same model.

Both sides train the same family preset (phase GAN ``demo`` by default) for the same epochs on
the same Parquet shards (phantom demo data, the demo's geometry), with the same batch size,
validating after every epoch:

(a) ``ctray.train``: ``ctray.train.trainer.make_trainer`` -> ``TorchTrainer.fit()`` with 1 and 2
    workers (1 CPU slot = 1 torch thread each, gloo), data streamed from the shards with Ray Data
    (what ``make_trainer`` does on its own), and the same with the shards materialized once
    (what ``ctray.tune`` hands its trials): the difference is the cost of streaming. These
    shards fit in a worker (``LoopConfig.cache_mb``), so in both the worker keeps the rows of
    its first pass and later epochs train from them (ctray.train.split_cache). The loop reports
    and checkpoints every epoch, as it does in a search.
(b) a bare loop in this process: the shards read once into torch tensors, a fresh permutation
    per epoch, the family's own ``train_step`` / ``eval_step``, 1 torch thread, no checkpoint.

The worker loop is timed from inside (``TimedLoop`` wraps the loop and ``ray.train.report``),
so a Ray run splits into: start-up (``fit()`` to the loop's first line: controller, worker
group, process group), setup in the loop (models, optimisers), per epoch the loop's own
``epoch_time_s`` (train + validation, data included), the state dict and ``save_state``, the
``ray.train.report`` call (checkpoint persisted to storage), and the teardown after the loop.
The headline ratio compares the epochs (first epoch's start to the last report's end) with the
bare loop's epochs; one-off start-up is shown beside it (``..._with_startup``).

The methods are interleaved: round ``r`` runs every method once before round ``r + 1``, so a
load that drifts hits all of them alike; every figure is the median over the rounds.

Usage::

    python benchmarks/bench_train.py [--quick] [--preset demo] [--phantoms N] [--epochs E]
                                     [--batch B] [--workers 1 2] [--repeats R]
                                     [--doc docs/benchmarks.md | --no-doc]

The last line printed is ``RESULT train_vs_torch=<x> train_vs_torch_with_startup=<y>
train2_vs_torch=<z>`` (1 worker, 1 worker with start-up, 2 workers; all against the bare loop).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from bench_common import (
    DOC,
    load_average,
    load_note,
    machine,
    stop_ray,
    tree_cpu_seconds,
    write_doc,
)

DOC_HEADING = "## Training (bench_train.py)"
FAMILY = "phase_gan"
# The phantom demo's task (experiments/tune_phase_gan.py): a native scan in, arterial or venous out.
DATA_OPTIONS = {"source_phases": ["native"], "target_phases": ["arterial", "venous"]}
SEED = 0


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What to measure.

    Attributes:
        preset: the phase-GAN preset both loops train.
        phantoms: phantom subjects in the shards (a quarter, at least one, for validation).
        patch: patch size in voxels (x, y, z); ``spacing``: its voxel size in mm.
        patches_per_subject: rows per subject.
        epochs: epochs per run (the preset's schedule: pre-training, then generator epochs).
        batch: per-worker batch size.
        workers: Ray Train worker counts to measure (the first is the headline).
        repeats: interleaved rounds.
        materialized: also measure 1 worker on shards materialized once (as ``ctray.tune``).
        quick: the smoke-test sizes were chosen.
    """

    preset: str = "demo"
    phantoms: int = 6
    patch: tuple[int, int, int] = (32, 32, 16)
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    patches_per_subject: int = 8
    epochs: int = 4
    batch: int = 4
    workers: tuple[int, ...] = (1, 2)
    repeats: int = 2
    materialized: bool = True
    quick: bool = False


QUICK = Settings(
    preset="debug",
    phantoms=3,
    patch=(16, 16, 16),
    spacing=(8.0, 8.0, 8.0),
    patches_per_subject=4,
    epochs=2,
    batch=2,
    repeats=1,
    quick=True,
)


# --------------------------------------------------------------------------- timings


@dataclass(kw_only=True)
class Run:
    """One timed run of a method.

    Attributes:
        rows: train rows per epoch (all workers together).
        epochs: whole seconds of each epoch, start to end (Ray: its report and checkpoint
            included).
        cpu: CPU seconds of each epoch (Ray: the whole session's process tree; bare: this
            process).
        total_s: seconds of the whole call (Ray: ``fit()``; bare: the epochs).
        split: named parts of ``total_s`` (seconds).
        loop_epochs: seconds of each epoch's train + validation alone.
        worker_cpu: CPU seconds of the (rank 0) worker process in each epoch (the first
            includes the setup in the loop); empty for the bare loop.
    """

    rows: int
    epochs: list[float]
    cpu: list[float]
    total_s: float
    split: dict[str, float] = field(default_factory=dict)
    loop_epochs: list[float] = field(default_factory=list)
    worker_cpu: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Samples/s over the epochs after the first (one-off first-use costs excluded)."""
        if len(self.epochs) < 2:
            return self.rate_all
        return self.rows * (len(self.epochs) - 1) / sum(self.epochs[1:])

    @property
    def cpu_per_sample(self) -> float:
        """CPU seconds per sample over the epochs after the first (load-independent)."""
        cpu = self.cpu[1:] if len(self.cpu) > 1 else self.cpu
        return sum(cpu) / (self.rows * len(cpu))

    @property
    def worker_cpu_per_sample(self) -> float:
        """The worker process's share of :attr:`cpu_per_sample` (NaN without a worker)."""
        cpu = self.worker_cpu[1:]
        return sum(cpu) / (self.rows * len(cpu)) if cpu else math.nan

    @property
    def rate_all(self) -> float:
        """Samples/s over all epochs."""
        return self.rows * len(self.epochs) / sum(self.epochs)

    @property
    def rate_with_startup(self) -> float:
        """Samples/s over the whole call."""
        return self.rows * len(self.epochs) / self.total_s


@dataclass(kw_only=True)
class Method:
    """A method and its runs (one per round)."""

    name: str
    note: str = ""
    runs: list[Run] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(getattr(r, key) for r in self.runs)

    def split(self) -> dict[str, float]:
        """Median seconds of each named part over the runs."""
        keys = list(self.runs[0].split)
        return {k: statistics.median(r.split[k] for r in self.runs) for k in keys}

    def epochs(self) -> list[float]:
        """Median whole seconds of each epoch."""
        return [statistics.median(e) for e in zip(*(r.epochs for r in self.runs), strict=True)]

    def loop_epochs(self) -> list[float]:
        """Median train + validation seconds of each epoch."""
        return [statistics.median(e) for e in zip(*(r.loop_epochs for r in self.runs), strict=True)]


def ray_split(
    reports: Sequence[Sequence[float]], *, entry: float, exit_: float, fit: tuple[float, float]
) -> tuple[list[float], dict[str, float]]:
    """The epochs' boundaries (wall clock) and a split of a Ray run, from the worker's timestamps.

    ``reports`` holds ``(call_start, call_end, epoch_time_s, ...)`` per epoch, ``entry`` and
    ``exit_`` the loop's first and last instant in the worker, ``fit`` the driver's ``fit()``
    start and end (all wall clock, one machine). Epoch ``k > 0`` starts when report ``k - 1``
    returns; the loop measures its train + validation as ``epoch_time_s``; what follows until
    the report call is the state dict and ``save_state``. Epoch 0's start is estimated with
    the later epochs' mean of that part (0 with a single epoch).
    """
    if not reports:
        raise ValueError("the worker reported no epoch")
    ends = [r[1] for r in reports]
    prep = [r[0] - (end + r[2]) for end, r in zip(ends, reports[1:], strict=False)]
    prep_mean = statistics.fmean(prep) if prep else 0.0
    first_start = reports[0][0] - reports[0][2] - prep_mean
    split = {
        "start-up (fit to loop)": entry - fit[0],
        "setup in loop": first_start - entry,
        "train + val (data included)": sum(r[2] for r in reports),
        "state dict + save_state": prep_mean * len(reports),
        "report (checkpoint persisted)": sum(r[1] - r[0] for r in reports),
        "teardown (loop to fit end)": fit[1] - exit_,
    }
    return [first_start, *ends], split


def _durations(bounds: Sequence[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(bounds)]


class CpuMeter:
    """Samples the CPU seconds of this process tree (the whole local Ray session) in a thread,
    so that the CPU used between any two instants of a run can be read afterwards."""

    def __init__(self, interval: float = 0.5) -> None:
        self.samples: list[tuple[float, float]] = []
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.samples.append((time.time(), tree_cpu_seconds()))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def between(self, bounds: Sequence[float]) -> list[float]:
        """CPU seconds used in each interval of ``bounds`` (linear between samples)."""
        times, cpu = zip(*self.samples, strict=True)
        at = np.interp(bounds, times, cpu)
        return [float(b - a) for a, b in itertools.pairwise(at)]


@dataclass(frozen=True)
class TimedLoop:
    """``ctray.train.loop.train_loop_per_worker`` with timestamps, written to ``out/<rank>.json``.

    Instrumentation only: it wraps ``ray.train.report`` in the worker to time each call and
    runs the real loop unchanged.
    """

    out: str

    def __call__(self, config: dict[str, Any]) -> None:
        import ray.train

        from ctray.train.loop import train_loop_per_worker

        entry, entry_cpu = time.time(), time.process_time()
        reports: list[tuple[float, float, float]] = []
        real_report = ray.train.report

        def timed_report(metrics: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            start = time.time()
            real_report(metrics, *args, **kwargs)
            end, cpu = time.time(), time.process_time()
            reports.append((start, end, float(metrics["epoch_time_s"]), cpu))

        ray.train.report = timed_report
        try:
            train_loop_per_worker(config)
        finally:
            ray.train.report = real_report
        rank = ray.train.get_context().get_world_rank()
        record = {
            "entry": entry,
            "entry_cpu": entry_cpu,
            "exit": time.time(),
            "reports": reports,
            "threads": torch.get_num_threads(),
        }
        Path(self.out, f"{rank}.json").write_text(json.dumps(record))


# --------------------------------------------------------------------------- data


def build_data(root: Path, settings: Settings) -> Path:
    """Phantom phase-GAN shards with the demo's task; returns the shard folder."""
    from ctray.data.build import BuildConfig
    from ctray.families.phase_gan.data import build

    out = root / "shards"
    config = BuildConfig(
        patch_size=settings.patch,
        spacing=settings.spacing,
        patches_per_subject=settings.patches_per_subject,
    )
    build(out=out, phantom=settings.phantoms, config=config, options=DATA_OPTIONS, progress=False)
    return out


def load_split(data_dir: Path, split: str, columns: Sequence[str]) -> dict[str, torch.Tensor]:
    """A whole split as torch tensors in memory (the bare loop's data)."""
    from ctray.data.shards import column_numpy, read_split

    table = read_split(data_dir, split, columns)
    return {c: torch.from_numpy(np.array(column_numpy(table[c]))) for c in columns}


# --------------------------------------------------------------------------- (b) bare loop


def family_config(settings: Settings) -> Any:
    from ctray.config import from_dict
    from ctray.registry import get_family

    spec = get_family(FAMILY)
    return from_dict(spec.config_cls, spec.preset(settings.preset), where="bench_train preset")


def _batches(data: dict[str, torch.Tensor], batch: int, order: torch.Tensor | None = None):
    n = len(next(iter(data.values())))
    index = torch.arange(n) if order is None else order
    for i in range(0, n, batch):
        idx = index[i : i + batch]
        yield {k: v[idx] for k, v in data.items()}


def bare_run(data_dir: Path, settings: Settings) -> Run:
    """The family's steps in a plain loop over in-memory tensors (1 torch thread, no Ray)."""
    from ctray.data.shards import load_manifest
    from ctray.registry import DataInfo, get_family
    from ctray.train.local import local_context
    from ctray.train.loop import Mean
    from ctray.train.state import seed_everything

    spec = get_family(FAMILY)
    stage = spec.stage(None)
    cfg = family_config(settings)
    train = load_split(data_dir, "train", spec.columns)
    val = load_split(data_dir, "val", spec.columns)
    seed_everything(SEED)
    ctx = local_context(
        spec, cfg, DataInfo.from_manifest(load_manifest(data_dir)), num_epochs=settings.epochs
    )
    if stage.init is not None:
        stage.init(cfg, {k: ctx.models[k] for k in stage.trains})
    rows = len(train[spec.columns[0]])
    per_epoch, cpu = [], []
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        epoch_start, cpu_start = time.perf_counter(), time.process_time()
        ctx.epoch = epoch
        for name in stage.trains:
            ctx.models[name].train()
        train_mean = Mean()
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(SEED + epoch))
        for batch in _batches(train, settings.batch, order):
            ctx.step = ctx.optimize.step
            for key, value in stage.train_step(ctx, batch).items():
                train_mean.add(key, value)
            ctx.optimize.end_batch()
        train_mean.result()
        for module in ctx.models.values():
            module.eval()
        val_mean = Mean()
        with torch.no_grad():
            for batch in _batches(val, settings.batch):
                for key, values in stage.eval_step(ctx, batch).items():
                    val_mean.add(key, values)
        val_mean.result()
        per_epoch.append(time.perf_counter() - epoch_start)
        cpu.append(time.process_time() - cpu_start)
    seconds = time.perf_counter() - start
    return Run(
        rows=rows,
        epochs=per_epoch,
        cpu=cpu,
        total_s=seconds,
        split={"train + val": seconds},
        loop_epochs=per_epoch,
    )


# --------------------------------------------------------------------------- (a) ctray.train


def ray_run(
    data_dir: Path,
    settings: Settings,
    *,
    workers: int,
    root: Path,
    prepared: dict[str, Any] | None = None,
) -> Run:
    """One ``make_trainer(...).fit()``, timed from the driver and from inside the worker loop."""

    import ctray.train.trainer as trainer_module
    from ctray.data.shards import load_manifest
    from ctray.registry import get_family
    from ctray.train.loop import LoopConfig
    from ctray.train.trainer import Resources, make_trainer

    spec = get_family(FAMILY)
    name = f"run-{time.time_ns()}"
    out = root / "timings" / name
    out.mkdir(parents=True)
    loop = LoopConfig(family=FAMILY, epochs=settings.epochs, batch_size=settings.batch, seed=SEED)
    with mock.patch.object(trainer_module, "train_loop_per_worker", TimedLoop(out=str(out))):
        trainer = make_trainer(
            spec=spec,
            loop=loop,
            family_config=family_config(settings),
            data_dir=data_dir,
            resources=Resources(workers=workers),
            storage_path=str(root / "ray"),
            name=name,
            prepared=prepared,
        )
        with CpuMeter() as meter:
            fit_start = time.time()
            trainer.fit()
            fit_end = time.time()
    record = json.loads((out / "0.json").read_text())
    if record["threads"] != 1:
        print(f"note: the Ray worker ran {record['threads']} torch threads (bare loop: 1)")
    bounds, split = ray_split(
        record["reports"], entry=record["entry"], exit_=record["exit"], fit=(fit_start, fit_end)
    )
    return Run(
        rows=load_manifest(data_dir).counts["train"],
        epochs=_durations(bounds),
        cpu=meter.between(bounds),
        total_s=fit_end - fit_start,
        split=split,
        loop_epochs=[r[2] for r in record["reports"]],
        worker_cpu=_durations([record["entry_cpu"]] + [r[3] for r in record["reports"]]),
    )


def idle_cpu_rate(seconds: float = 5.0) -> float:
    """CPU seconds per second the idle Ray session (GCS, raylet, dashboard, agents) burns."""
    start, cpu = time.time(), tree_cpu_seconds()
    time.sleep(seconds)
    return (tree_cpu_seconds() - cpu) / (time.time() - start)


def start_ray() -> None:
    """A local session like ``ctray.session.init_ray``'s (8 logical CPUs, the dashboard that
    Ray Train's placement-group cleanup needs), without the workers' logs on this terminal."""
    import ray

    from ctray.session import configure_data

    ray.init(
        num_cpus=8,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        logging_level="WARNING",
    )
    configure_data()


# --------------------------------------------------------------------------- report


RATES = (
    ("rate", "epochs after the first"),
    ("rate_all", "all epochs"),
    ("rate_with_startup", "whole run"),
)


def table(methods: Sequence[Method], bare: Method) -> str:
    """Samples/s of every method three ways and its CPU cost, each beside the bare loop's."""
    head = (
        "| method | "
        + " | ".join(f"samples/s, {label} | vs bare" for _, label in RATES)
        + " | CPU ms/sample | bare / this | run s | notes |\n|---|"
        + "---:|" * (2 * len(RATES) + 3)
        + "---|"
    )
    rows = []
    for m in methods:
        cells = " | ".join(
            f"{m.median(k):.1f} | {m.median(k) / bare.median(k):.2f}" for k, _ in RATES
        )
        cpu = m.median("cpu_per_sample")
        rows.append(
            f"| {m.name} | {cells} | {1000 * cpu:.0f} | {bare.median('cpu_per_sample') / cpu:.2f} "
            f"| {m.median('total_s'):.1f} | {m.note} |"
        )
    return "\n".join([head, *rows])


def _seconds(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def split_table(methods: Sequence[Method]) -> str:
    """Median seconds of each part of a run and of each epoch, one column per method."""
    parts: list[str] = []
    for m in methods:
        parts += [k for k in m.split() if k not in parts]
    head = "| part (s, median) | " + " | ".join(m.name for m in methods) + " |"
    rule = "|---|" + "---:|" * len(methods)
    rows = [
        f"| {part} | " + " | ".join(f"{m.split().get(part, 0.0):.2f}" for m in methods) + " |"
        for part in parts
    ]
    rows.append("| each epoch, whole | " + " | ".join(_seconds(m.epochs()) for m in methods) + " |")
    rows.append(
        "| each epoch, train + val | "
        + " | ".join(_seconds(m.loop_epochs()) for m in methods)
        + " |"
    )
    return "\n".join([head, rule, *rows])


def result_line(bare: Method, one: Method, two: Method | None) -> str:
    """The ratios against the bare loop; ``_cpu`` compares CPU seconds per sample instead."""

    def ratio(m: Method, key: str) -> str:
        return f"{m.median(key) / bare.median(key):.2f}"

    cpu = bare.median("cpu_per_sample") / one.median("cpu_per_sample")
    line = (
        f"RESULT train_vs_torch={ratio(one, 'rate')} "
        f"train_vs_torch_all_epochs={ratio(one, 'rate_all')} "
        f"train_vs_torch_with_startup={ratio(one, 'rate_with_startup')} "
        f"train_vs_torch_cpu={cpu:.2f}"
    )
    if two is not None:
        line += f" train2_vs_torch={ratio(two, 'rate')}"
    return line


def _steady(values: Sequence[float]) -> float:
    """Mean seconds of the epochs after the first."""
    return statistics.fmean(values[1:]) if len(values) > 1 else values[0]


def analysis(
    bare: Method, one: Method, others: Sequence[Method], load: tuple[str, str], idle: float
) -> str:
    """Where the 1-worker run's time goes beyond the bare loop's, from the measured splits."""
    split = one.split()
    n = len(one.epochs())
    bare_epoch, ray_epoch = _steady(bare.epochs()), _steady(one.epochs())
    loop_epoch = _steady(one.loop_epochs())
    ckpt = (split["state dict + save_state"] + split["report (checkpoint persisted)"]) / n
    lines = [f"Where {one.name} spends its time beyond the bare loop's (medians):", ""]
    lines.append(
        f"- An epoch after the first: {ray_epoch:.2f}s against {bare_epoch:.2f}s "
        f"({ray_epoch / bare_epoch - 1:+.0%}); train + validation inside the loop "
        f"{loop_epoch:.2f}s ({loop_epoch - bare_epoch:+.2f}s: data path, Ray Data iterator, the "
        f"loop's bookkeeping), state dict + checkpoint + report {ckpt:.2f}s per epoch."
    )
    cpu, bare_cpu = one.median("cpu_per_sample"), bare.median("cpu_per_sample")
    worker = one.median("worker_cpu_per_sample")
    idle_ms = 1000 * idle * ray_epoch / one.runs[0].rows
    lines.append(
        f"- CPU per sample after the first epoch: {1000 * cpu:.0f} ms for the whole Ray "
        f"session against {1000 * bare_cpu:.0f} ms bare. The worker process took "
        f"{1000 * worker:.0f} ms (training, the Ray Data iterator's threads, reporting); the "
        f"rest, {1000 * (cpu - worker):.0f} ms, went to read tasks, split coordinators, the "
        f"Train controller and Ray's daemons, which burn {idle:.2f} CPU-s per second even "
        f"when idle (about {idle_ms:.0f} ms per sample at this epoch length). On "
        f"{os.cpu_count()} cores that CPU is taken from training."
    )
    first_gap = one.epochs()[0] - bare.epochs()[0]
    lines.append(
        f"- The first epoch: {one.epochs()[0]:.2f}s against {bare.epochs()[0]:.2f}s "
        f"({first_gap:+.2f}s): first use in a fresh worker process (a split coordinator actor "
        "per dataset, Ray Data's streaming executor and first read tasks; lazy imports and "
        "first-call kernels in the steps)."
    )
    oneoff = one.median("total_s") - sum(one.epochs())
    lines.append(
        f"- One-off per run: start-up {split['start-up (fit to loop)']:.1f}s (controller, worker "
        f"group, process group), setup in the loop {split['setup in loop']:.1f}s (imports, "
        f"models, optimisers), teardown {split['teardown (loop to fit end)']:.1f}s: about "
        f"{oneoff:.1f}s of the {one.median('total_s'):.1f}s run."
    )
    for m in others:
        if "materialized" in m.name:
            other = _steady(m.loop_epochs())
            lines.append(
                f"- {m.name}: train + validation {other:.2f}s per epoch after the first, "
                f"against {loop_epoch:.2f}s streaming: streaming costs {loop_epoch - other:+.2f}s "
                "per epoch over blocks already in the object store."
            )
        else:
            lines.append(
                f"- {m.name}: {m.median('rate') / one.median('rate'):.2f}x the 1-worker "
                f"samples/s ({os.cpu_count()} cores, 1 torch thread per worker)."
            )
    lines.append(f"- {load_note(*load)}.")
    return "\n".join(lines)


def doc_section(
    settings: Settings,
    methods: Sequence[Method],
    result: str,
    notes: str,
    seconds: float,
    load: tuple[str, str],
    rows: dict[str, int],
) -> str:
    base = QUICK if settings.quick else Settings()
    command = "python benchmarks/bench_train.py" + (" --quick" if settings.quick else "")
    if settings.repeats != base.repeats:
        command += f" --repeats {settings.repeats}"
    patch = "x".join(map(str, settings.patch))
    return f"""{DOC_HEADING}

Generated by `{command}` on {dt.date.today().isoformat()}; machine:
{machine("ray", "torch")}. Total run {seconds:.0f}s; load average (1 min) {load[0]} at
start, {load[1]} at end.

Settings: {FAMILY} `{settings.preset}` preset, {settings.epochs} epochs, batch
{settings.batch} per worker, validation after every epoch; {settings.phantoms} phantoms,
patches {patch} at {"x".join(map(str, settings.spacing))} mm, {rows["train"]} train and
{rows["val"]} validation rows (demo task: native in, arterial or venous out).
{settings.repeats} interleaved round(s); 1 torch thread per worker and in the bare loop;
`ray.init(num_cpus=8)`, worker logs off.

{table(methods, methods[0])}

{split_table(methods)}

`{result}`

{notes}
"""


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (~1 minute idle)")
    parser.add_argument("--preset", help="phase-GAN preset both loops train")
    parser.add_argument("--phantoms", type=int, help="phantom subjects in the shards")
    parser.add_argument("--epochs", type=int, help="epochs per run")
    parser.add_argument("--batch", type=int, help="batch size per worker")
    parser.add_argument("--workers", type=int, nargs="+", help="Ray Train worker counts")
    parser.add_argument("--repeats", type=int, help="interleaved rounds")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown to update")
    parser.add_argument("--no-doc", action="store_true", help="do not update the markdown")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Settings()
    settings = Settings(
        preset=args.preset or base.preset,
        phantoms=args.phantoms or base.phantoms,
        patch=base.patch,
        spacing=base.spacing,
        patches_per_subject=base.patches_per_subject,
        epochs=args.epochs or base.epochs,
        batch=args.batch or base.batch,
        workers=tuple(args.workers or base.workers),
        repeats=args.repeats or base.repeats,
        quick=base.quick,
    )
    if settings.phantoms < 2 or min(settings.workers) < 1 or settings.epochs < 1:
        parser.error("need --phantoms >= 2, --epochs >= 1 and --workers >= 1")
    return settings, None if args.no_doc else args.doc


def main(argv: Sequence[str] | None = None) -> int:

    from ctray.data.shards import load_manifest
    from ctray.registry import get_family
    from ctray.train.trainer import datasets

    settings, doc = parse_args(argv)
    torch.set_num_threads(1)  # as one Ray Train worker with 1 CPU slot
    started = time.perf_counter()
    load_start = load_average()
    print(f"load average (1 min) at start: {load_start}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="ctray-bench-train-"))
    try:
        data_dir = build_data(root, settings)
        manifest = load_manifest(data_dir)
        print(
            f"shards {manifest.counts} ready after {time.perf_counter() - started:.0f}s",
            flush=True,
        )
        start_ray()
        idle = idle_cpu_rate()
        print(f"idle Ray session: {idle:.2f} CPU-s per second", flush=True)
        bare = Method(name="bare PyTorch loop", note="in-memory tensors, 1 thread, no Ray")
        methods = [bare]
        runners = [lambda: bare_run(data_dir, settings)]
        for w in settings.workers:
            m = Method(
                name=f"ctray.train, {w} worker{'s' if w > 1 else ''}",
                note="streams the shards in epoch 1, later epochs from worker memory; "
                "checkpoint every epoch",
            )
            methods.append(m)
            runners.append(lambda w=w: ray_run(data_dir, settings, workers=w, root=root))
        if settings.materialized:
            start = time.perf_counter()
            spec = get_family(FAMILY)
            prepared = datasets(spec, data_dir, manifest, materialize=True, seed=SEED)
            m = Method(
                name=f"ctray.train, {settings.workers[0]} worker, materialized",
                note=f"shards materialized once as ctray.tune does "
                f"({time.perf_counter() - start:.1f}s, not counted)",
            )
            methods.append(m)
            runners.append(
                lambda: ray_run(
                    data_dir, settings, workers=settings.workers[0], root=root, prepared=prepared
                )
            )
        for r in range(settings.repeats):
            for m, run in zip(methods, runners, strict=True):
                m.runs.append(run())
                print(
                    f"round {r + 1} {m.name}: {m.runs[-1].rate:.1f} samples/s over the epochs, "
                    f"{m.runs[-1].total_s:.1f}s in all",
                    flush=True,
                )
    finally:
        stop_ray()
        shutil.rmtree(root, ignore_errors=True)

    one = methods[1]
    two = next((m for m in methods[2:] if "2 workers" in m.name), None)
    result = result_line(bare, one, two)
    load = (load_start, load_average())
    notes = analysis(bare, one, methods[2:], load, idle)
    seconds = time.perf_counter() - started
    print(f"load average (1 min) at end: {load[1]}")
    print()
    print(table(methods, bare))
    print()
    print(split_table(methods))
    print()
    print(notes)
    if doc is not None:
        write_doc(
            doc,
            DOC_HEADING,
            doc_section(settings, methods, result, notes, seconds, load, manifest.counts),
        )
        print(f"\nwrote {doc}")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
