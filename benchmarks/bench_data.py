"""Data-loading throughput: Ray Data over Parquet shards vs per-sample NIfTI + MONAI vs pyarrow.

Three ways to feed a training loop with batches of ``B`` (source, target) patch pairs of
``P^3`` float32 voxels, all from the same clinical-size phantoms (256x256x128 voxels at
1.5x1.5x2.5 mm, resampled to the shard spacing):

(a) Ray Data exactly as a Ray Train worker reads the train split: the dataset built once by
    ``ctray.train.trainer.read_shards(files, COLUMNS, shuffle_seed=0)`` (V1 Parquet reader,
    columns pushed into the reader, seeded file order), split with ``streaming_split(1)`` as
    Ray Train does for one worker, one ``iter_torch_batches(batch_size=B)`` pass per epoch,
    streaming from Parquet every epoch (the headline). Also measured: the path before this
    benchmark's fixes, the dataset rebuilt every epoch, the shards materialized once (as
    ``ctray.tune`` does when they fit), Ray 2.60's defaults (V2 Parquet datasource) and the
    iteration variants in ``VARIANTS``.
(b) the seeds' way: every sample decodes two ``.nii.gz`` volumes and runs MONAI
    ``LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd -> ScaleIntensityRanged
    -> RandSpatialCropd``; samples come from a ``torch.utils.data.DataLoader`` with one worker
    per core and are stacked to ``B`` with ``torch.stack``.
(c) the ceiling: a raw pyarrow read of the same shards (``ParquetFile.iter_batches``,
    ``to_numpy_ndarray`` without copying, ``torch.from_numpy``).

The methods are interleaved: timed repeat ``r`` runs one epoch of every method in turn before
repeat ``r + 1`` starts, so a load that drifts during the run hits all of them alike; every
figure is the median over the repeats. Beside patches/s, each epoch's CPU seconds are counted
(pyarrow: this process; the others: this process tree, i.e. the whole local Ray session):
they depend much less than wall time on how busy a shared machine is.

Usage::

    python benchmarks/bench_data.py [--quick] [--patch 64] [--batch 8] [--patches N]
                                    [--repeats R] [--doc docs/benchmarks.md | --no-doc]

The last line printed is ``RESULT data_stream_vs_arrow=<a/c> ray_vs_nifti=<a/b>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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

from ctray.data.build import crop, prepare
from ctray.data.nifti import HUWindow, Volume, save_nifti
from ctray.data.phantom import PhantomConfig, make_phantom
from ctray.data.shards import rows_to_table, write_table_atomic

DOC_HEADING = "## Data loading (bench_data.py)"
CLINICAL_SHAPE = (256, 256, 128)
CLINICAL_SPACING = (1.5, 1.5, 2.5)
SHARD_SPACING = (1.5, 1.5, 1.5)
WINDOW = HUWindow(lo=-1000.0, hi=1000.0)
COLUMNS = ("source", "target")  # the tensor columns every method delivers per patch
ENHANCEMENT_HU = 120.0  # the "target phase": organs brighter than in the native source

Batch = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What to measure.

    Attributes:
        patch: edge of the cubic patch in voxels.
        batch: patches per batch, the same for every method.
        patches: train patches in the shards (one Ray/pyarrow epoch reads all of them).
        subjects: phantom subjects (one NIfTI pair and one shard file each).
        repeats: timed epochs per Ray/pyarrow method.
        nifti_batches: batches per timed NIfTI epoch (each sample costs seconds).
        nifti_repeats: timed NIfTI epochs (in the first ``nifti_repeats`` rounds).
        nifti_workers: DataLoader worker processes for the NIfTI pipeline.
        row_group: rows per Parquet row group in the shards.
        quick: the smoke-test sizes were chosen.
    """

    patch: int = 64
    batch: int = 8
    patches: int = 512
    subjects: int = 2
    repeats: int = 3
    nifti_batches: int = 1
    nifti_repeats: int = 2
    nifti_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    row_group: int = 64
    quick: bool = False

    @property
    def patches_per_subject(self) -> int:
        per = -(-self.patches // self.subjects)
        return -(-per // self.batch) * self.batch  # whole batches per shard file


@dataclass(frozen=True, kw_only=True)
class Subject:
    """One phantom: its NIfTI pair and its shard file."""

    name: str
    source_nii: Path
    target_nii: Path
    shard: Path


@dataclass(kw_only=True)
class Measurement:
    """Patches per second and CPU milliseconds per patch of one method over its repeats."""

    method: str
    rates: list[float]
    patches: int
    cpu_ms: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_ms) if self.cpu_ms else math.nan

    @property
    def epoch_s(self) -> float:
        """Median seconds per epoch."""
        return self.patches / self.median

    def row(self) -> str:
        return (
            f"| {self.method} | {self.median:,.1f} | {min(self.rates):,.1f} | "
            f"{max(self.rates):,.1f} | {self.cpu_median:,.1f} | {len(self.rates)} | "
            f"{self.patches} | {self.note} |"
        )


@dataclass(kw_only=True)
class Method:
    """One way to deliver an epoch of batches, timed in the interleaved rounds.

    Attributes:
        name: table label.
        epoch: runs one epoch and returns the patches it delivered.
        repeats: timed epochs (rounds ``0 .. repeats - 1`` run it).
        patches: patches per epoch.
        note: table note.
        warm_up: run one untimed epoch before the timed rounds.
        cpu_clock: CPU seconds so far of what the method runs on (this process, or the
            process tree with the Ray session and the DataLoader workers).
    """

    name: str
    epoch: Callable[[], int]
    repeats: int
    patches: int
    note: str = ""
    warm_up: bool = True
    cpu_clock: Callable[[], float] = tree_cpu_seconds
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    def timed_epoch(self) -> float:
        start, cpu = time.perf_counter(), self.cpu_clock()
        count = self.epoch()
        rate = count / (time.perf_counter() - start)
        self.cpu_ms.append(1000 * (self.cpu_clock() - cpu) / count)
        self.rates.append(rate)
        return rate

    def measurement(self) -> Measurement:
        return Measurement(
            method=self.name,
            rates=self.rates,
            patches=self.patches,
            cpu_ms=self.cpu_ms,
            note=self.note,
        )


# --------------------------------------------------------------------------- data


def _target_phase(native: Volume, labels: np.ndarray) -> Volume:
    """A cheap stand-in for a contrast phase: enhanced organs, fresh noise."""
    rng = np.random.default_rng(int(labels.sum()) % (2**32))
    hu = native.array + ENHANCEMENT_HU * (labels > 0) + rng.normal(0.0, 10.0, native.shape)
    return Volume(array=hu.astype(np.float32), affine=native.affine)


def _shard_rows(
    source: Volume, target: Volume, name: str, settings: Settings, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Patch rows with the phase-GAN shard columns, cut from the resampled, windowed volumes."""
    src = WINDOW.normalise(prepare(source, SHARD_SPACING).array)
    tgt = WINDOW.normalise(prepare(target, SHARD_SPACING).array)
    body = (src > WINDOW.normalise(np.float32(-500.0))).astype(np.uint8)
    size = (settings.patch,) * 3
    limits = [n - settings.patch for n in src.shape]
    rows = []
    for _ in range(settings.patches_per_subject):
        origin = tuple(int(rng.integers(0, lim + 1)) for lim in limits)
        rows.append(
            {
                "source": crop(src, origin, size),
                "target": crop(tgt, origin, size),
                "truth": crop(tgt, origin, size),
                "labels": crop(body, origin, size),
                "source_phase": np.int8(0),
                "target_phase": np.int8(2),
                "subject": name,
                "origin": list(origin),
            }
        )
    return rows


def make_subject(k: int, root: Path, settings: Settings) -> Subject:
    """Phantom ``k``: write its NIfTI pair and the shard of patches cut from it."""
    name = f"phantom-{k:03d}"
    config = PhantomConfig(shape=CLINICAL_SHAPE, spacing=CLINICAL_SPACING)
    native, labels = make_phantom(seed=k, config=config)
    target = _target_phase(native, labels)
    subject = Subject(
        name=name,
        source_nii=root / "nifti" / f"{name}_native.nii.gz",
        target_nii=root / "nifti" / f"{name}_venous.nii.gz",
        shard=root / "shards" / "train" / f"{name}.parquet",
    )
    save_nifti(subject.source_nii, native.array, native.affine)
    save_nifti(subject.target_nii, target.array, target.affine)
    rows = _shard_rows(native, target, name, settings, np.random.default_rng(k))
    write_table_atomic(rows_to_table(rows), subject.shard, row_group_size=settings.row_group)
    return subject


def make_data(root: Path, settings: Settings) -> list[Subject]:
    """Write the clinical-size NIfTI pairs and the Parquet shards cut from the same phantoms."""
    workers = max(1, min(settings.subjects, os.cpu_count() or 1))
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        jobs = [pool.submit(make_subject, k, root, settings) for k in range(settings.subjects)]
        return [job.result() for job in jobs]


# --------------------------------------------------------------------------- (b) NIfTI + MONAI


def monai_pipeline(patch: int) -> Any:
    """The per-sample MONAI transform chain of the seeds (dict keys ``source``/``target``)."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandSpatialCropd,
        ScaleIntensityRanged,
        Spacingd,
    )

    keys = list(COLUMNS)
    return Compose(
        [
            LoadImaged(keys=keys, reader="NibabelReader", image_only=True),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS"),
            Spacingd(keys=keys, pixdim=SHARD_SPACING, mode="bilinear"),
            ScaleIntensityRanged(
                keys=keys, a_min=WINDOW.lo, a_max=WINDOW.hi, b_min=0.0, b_max=1.0, clip=True
            ),
            RandSpatialCropd(keys=keys, roi_size=(patch,) * 3, random_size=False),
        ]
    )


def nifti_epoch(subjects: Sequence[Subject], settings: Settings) -> int:
    """One epoch of the seeds' loader: decode + transform every sample, stack to batches."""
    from monai.data import Dataset

    count = settings.batch * settings.nifti_batches
    items = [{"source": str(s.source_nii), "target": str(s.target_nii)} for s in subjects]
    data = Dataset(
        data=[items[i % len(items)] for i in range(count)], transform=monai_pipeline(settings.patch)
    )
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, shuffle=True, num_workers=settings.nifti_workers
    )
    return sum(_batch_size(b) for b in _stacked(iter(loader), settings.batch))


def _stacked(samples: Iterator[dict[str, Any]], batch: int) -> Iterator[Batch]:
    """Stack single samples (channel-first MetaTensors) into plain ``(B, P, P, P)`` tensors."""
    pending: list[dict[str, Any]] = []
    for sample in samples:
        pending.append(sample)
        if len(pending) == batch:
            yield {k: torch.stack([s[k].as_tensor()[0] for s in pending]) for k in COLUMNS}
            pending = []
    if pending:
        yield {k: torch.stack([s[k].as_tensor()[0] for s in pending]) for k in COLUMNS}


def _batch_size(batch: Batch) -> int:
    first = batch[COLUMNS[0]]
    if tuple(first.shape[1:]) != tuple(batch[COLUMNS[-1]].shape[1:]):
        raise AssertionError("source/target batches disagree")
    return int(first.shape[0])


# --------------------------------------------------------------------------- (c) pyarrow


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` of a possibly read-only array (nothing here writes to it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _tensor(column: pa.Array | pa.ChunkedArray) -> torch.Tensor:
    """A fixed-shape tensor column as a torch tensor without copying."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return _from_numpy(column.to_numpy_ndarray())


def arrow_epoch(files: Sequence[str], batch: int) -> int:
    """Read every shard with pyarrow, ``batch`` rows at a time, as torch tensors."""
    count = 0
    for path in files:
        reader = pq.ParquetFile(path)
        for record_batch in reader.iter_batches(batch_size=batch, columns=list(COLUMNS)):
            tensors = {k: _tensor(record_batch.column(k)) for k in COLUMNS}
            count += _batch_size(tensors)
    return count


# --------------------------------------------------------------------------- (a) Ray Data

SHUFFLE_SEED = 0


@dataclass(frozen=True, kw_only=True)
class RayMethod:
    """One way of building and iterating the Ray Dataset.

    Attributes:
        name: table label.
        build: ``"ctray"`` (``read_shards`` with the train split's seeded file order),
            ``"before"`` (the reader before this benchmark's fixes: ``select_columns`` after
            ``read_parquet``, ``randomize_block_order`` on the stream) or ``"v2"`` (Ray 2.60's
            defaults: ``use_datasource_v2 = True``, plain ``read_parquet``).
        per_epoch: build the dataset anew every epoch (timed) instead of once (untimed, as
            ``make_trainer`` and ``run_tune`` do).
        split: iterate ``streaming_split(1)[0]``, as Ray Train hands one worker its shard.
        materialize: ``.materialize()`` once, then time iterations over the object store.
        batch_format: ``"torch"`` uses ``iter_torch_batches``; ``"pyarrow"`` uses
            ``iter_batches`` and converts with ``to_numpy_ndarray`` + ``torch.from_numpy``.
        iterate: extra ``iter_torch_batches`` / ``iter_batches`` arguments.
        note: table note.
    """

    name: str
    build: str = "ctray"
    per_epoch: bool = False
    split: bool = True
    materialize: bool = False
    batch_format: str = "torch"
    iterate: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _read_blocks() -> int:
    from ctray.train.trainer import READ_BLOCKS

    return READ_BLOCKS


def footer_actors() -> int:
    """Footer-reading actors Ray 2.60's V2 Parquet datasource starts per execution."""
    try:
        from ray.data._internal.datasource_v2.formats.parquet import footer_file_indexer
    except ImportError:
        return int(os.environ.get("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "32"))
    default = footer_file_indexer._DEFAULT_NUM_ACTORS
    return int(os.environ.get("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", default))


STREAM = RayMethod(
    name="ray stream, as a ctray.train worker",
    note="headline a: read_shards once (columns in the reader, seeded file order), "
    "streaming_split(1), Parquet read every epoch",
)
BEFORE = RayMethod(
    name="ray stream, before: select_columns, rebuilt every epoch",
    build="before",
    per_epoch=True,
    split=False,
    note="the earlier headline (0.65-0.81 of c): its dataset creation samples every column",
)
BEFORE_TRAIN = RayMethod(
    name="ray stream, before: as ctray.train was",
    build="before",
    note="select_columns + randomize_block_order (a barrier: a whole epoch in the object "
    "store before the first batch), streaming_split(1)",
)
REBUILT = RayMethod(
    name="ray stream, read_shards rebuilt every epoch",
    per_epoch=True,
    split=False,
    note="dataset creation (a sampling read) timed in every epoch",
)
MATERIALIZED = RayMethod(
    name="ray materialized, read_shards().materialize()",
    materialize=True,
    note="as ctray.tune when the shards fit (epochs after the first)",
)
V2_DEFAULTS = RayMethod(
    name="ray stream, Ray 2.60 defaults (V2 reader)",
    build="v2",
    per_epoch=True,
    split=False,
    note=f"use_datasource_v2=True, {footer_actors()} footer actors per epoch",
)
VARIANTS = (
    RayMethod(
        name="ray stream, as ctray.train + prefetch_batches=4",
        iterate={"prefetch_batches": 4},
        note="default prefetch_batches=1",
    ),
    RayMethod(
        name="ray stream, as ctray.train, iter_batches pyarrow",
        batch_format="pyarrow",
        note="to_numpy_ndarray + torch.from_numpy, no copy",
    ),
)


@contextmanager
def datasource_v2(enabled: bool) -> Iterator[None]:
    """Set ``DataContext.use_datasource_v2`` for the block, then restore it."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = enabled
    try:
        yield
    finally:
        ctx.use_datasource_v2 = saved


def ray_dataset(files: Sequence[str], method: RayMethod) -> Any:
    """The dataset of a method (lazy: every iteration reads the shards again)."""
    import ray

    from ctray.train.trainer import READ_BLOCKS, read_shards

    if method.build == "v2":  # read_shards would switch the V1 reader back on
        return ray.data.read_parquet(list(files)).select_columns(list(COLUMNS))
    if method.build == "before":
        blocks = max(len(files), READ_BLOCKS)
        ds = ray.data.read_parquet(list(files), override_num_blocks=blocks)
        ds = ds.select_columns(list(COLUMNS))
        return ds if method.per_epoch else ds.randomize_block_order(seed=SHUFFLE_SEED)
    if method.materialize:
        ds = read_shards(list(files), COLUMNS).materialize()
        return ds.randomize_block_order(seed=SHUFFLE_SEED)
    return read_shards(list(files), COLUMNS, shuffle_seed=SHUFFLE_SEED)


def ray_epoch(source: Any, method: RayMethod, batch: int) -> int:
    """Iterate one epoch of torch batches from a dataset or split iterator; count the patches."""
    count = 0
    if method.batch_format == "torch":
        for b in source.iter_torch_batches(batch_size=batch, **method.iterate):
            count += _batch_size(b)
        return count
    batches = source.iter_batches(
        batch_size=batch, batch_format=method.batch_format, **method.iterate
    )
    for b in batches:
        count += _batch_size({k: _tensor(b.column(k)) for k in COLUMNS})
    return count


def ray_method(files: Sequence[str], method: RayMethod, settings: Settings) -> Method:
    """A timed method for one Ray Data setting; a dataset built once is built here."""
    note = method.note
    if method.per_epoch:

        def epoch() -> int:
            with datasource_v2(True) if method.build == "v2" else nullcontext():
                return ray_epoch(ray_dataset(files, method), method, settings.batch)
    else:
        start = time.perf_counter()
        dataset = ray_dataset(files, method)
        source = dataset.streaming_split(1, equal=True)[0] if method.split else dataset
        label = "materialize()" if method.materialize else "dataset creation"
        note = f"{note}; {label} {time.perf_counter() - start:.1f}s once"

        def epoch() -> int:
            return ray_epoch(source, method, settings.batch)

    return Method(
        name=method.name,
        epoch=epoch,
        repeats=settings.repeats,
        patches=run_patches(settings),
        note=note,
    )


def run_patches(settings: Settings) -> int:
    return settings.patches_per_subject * settings.subjects


def start_ray() -> None:
    """One local Ray session with more logical CPUs than cores, progress bars off."""
    import ray

    from ctray.session import configure_data

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    configure_data()
    logging.getLogger("ray.data").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- rounds


def run_rounds(methods: Sequence[Method]) -> None:
    """One untimed warm-up epoch each, then the interleaved timed rounds."""
    for m in methods:
        if m.warm_up:
            start = time.perf_counter()
            m.epoch()
            print(f"warm-up {m.name}: {time.perf_counter() - start:.1f}s", flush=True)
    for r in range(max(m.repeats for m in methods)):
        rates = [f"{m.name}: {m.timed_epoch():,.1f}" for m in methods if r < m.repeats]
        print(f"round {r + 1} (patches/s) " + "; ".join(rates), flush=True)


# --------------------------------------------------------------------------- report


def table(results: Sequence[Measurement]) -> str:
    head = (
        "| method | patches/s (median) | min | max | CPU ms/patch | repeats | patches/epoch "
        "| notes |\n|---|---:|---:|---:|---:|---:|---:|---|"
    )
    return "\n".join([head, *(m.row() for m in results)])


def result_line(ray: Measurement, nifti: Measurement, arrow: Measurement) -> str:
    return (
        f"RESULT data_stream_vs_arrow={ray.median / arrow.median:.2f} "
        f"ray_vs_nifti={ray.median / nifti.median:.2f}"
    )


def by_name(results: Sequence[Measurement], method: RayMethod) -> Measurement | None:
    return next((m for m in results if m.method == method.name), None)


def _versus(m: Measurement, ref: Measurement) -> str:
    """``m``'s median relative to ``ref``'s, and whether it lies outside ``ref``'s spread."""
    ratio = m.median / ref.median
    if min(m.rates) > max(ref.rates):
        verdict = "faster beyond the run-to-run spread"
    elif max(m.rates) < min(ref.rates):
        verdict = "slower beyond the run-to-run spread"
    else:
        verdict = "the min-max ranges overlap, so within the run-to-run spread"
    return f"{ratio:.2f}x the headline's median ({verdict})"


def analysis(
    results: Sequence[Measurement], nifti: Measurement, arrow: Measurement, load: tuple[str, str]
) -> str:
    """The notes under the table, all from the measured numbers."""
    lines = ["Share of the pyarrow ceiling c and multiple of the NIfTI baseline b (medians):", ""]
    lines += [
        f"- {m.method}: {m.median / arrow.median:.2f} of c, {m.median / nifti.median:,.0f}x b"
        for m in results
        if m.method.startswith("ray")
    ]
    head = by_name(results, STREAM)
    assert head is not None
    lines += ["", "What costs Ray Data time here:", ""]
    lines.append(
        f"- CPU per patch: the headline {head.cpu_median:.1f} ms (the whole Ray session: read "
        f"tasks, object store, split coordinator, daemons) against pyarrow's "
        f"{arrow.cpu_median:.1f} ms in one process; on {os.cpu_count()} cores Ray's read tasks "
        "decode in parallel with the consumer, pyarrow decodes in the consumer."
    )
    before, rebuilt = by_name(results, BEFORE), by_name(results, REBUILT)
    if before is not None and rebuilt is not None:
        lines.append(
            "- Building the dataset samples the first row group of the files to estimate their "
            "in-memory size. With `select_columns` after `read_parquet` (before) that sample "
            "decodes every column, `truth` and `labels` too: rebuilt every epoch it cost "
            f"{before.cpu_median:.1f} ms CPU per patch, {before.median / arrow.median:.2f} of c; "
            f"with the columns in the reader {rebuilt.cpu_median:.1f} ms, "
            f"{rebuilt.median / arrow.median:.2f} of c. `ctray.train` builds its datasets once "
            "per run, so an epoch pays only the read tasks (the headline)."
        )
    old_train = by_name(results, BEFORE_TRAIN)
    if old_train is not None:
        lines.append(
            f"- The train split as `ctray.train` read it before: {old_train.median:,.0f} "
            f"patches/s ({old_train.median / arrow.median:.2f} of c) against the headline's "
            f"{head.median:,.0f}. `randomize_block_order` on a stream is an all-to-all step: "
            "every epoch it waits for all read tasks and holds the whole split in the object "
            "store (spilling once shards outgrow it) before the first batch; the seeded file "
            "order of `read_shards` streams."
        )
    v2 = by_name(results, V2_DEFAULTS)
    if v2 is not None:
        lines.append(
            f"- Ray 2.60's default V2 Parquet datasource starts a `ListFiles` step with "
            f"{footer_actors()} `FooterReader` actors (`RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`) on "
            f"every execution, i.e. every streamed epoch: {v2.epoch_s:.1f}s per epoch of "
            f"{v2.patches} patches (rebuilt each epoch) against {head.epoch_s:.1f}s; "
            "`ctray.session.configure_data` keeps the V1 reader."
        )
    mat = by_name(results, MATERIALIZED)
    if mat is not None:
        lines.append(
            f"- Materialized once (what `ctray.tune` does while the shards fit in "
            f"`materialize_share` of the object store), later epochs iterate blocks already in "
            f"shared memory: {mat.median:,.0f} patches/s, {mat.median / head.median:.1f}x "
            f"streaming and {mat.median / arrow.median:.1f}x the pyarrow re-read (which "
            "decodes Parquet every epoch); the one-off read is the materialize() time in its "
            "note."
        )
    for variant in VARIANTS:
        m = by_name(results, variant)
        if m is not None:
            lines.append(f"- {variant.name}: {_versus(m, head)}.")
    lines.append(
        f"- {load_note(*load)}. The methods ran interleaved (one epoch of each per round), so "
        "a drifting load hits all alike; CPU ms/patch depends less on the load than patches/s "
        "(the same method moved by up to 1.8x between runs here)."
    )
    return "\n".join(lines)


def doc_section(
    settings: Settings,
    results: Sequence[Measurement],
    result: str,
    notes: str,
    seconds: float,
    load: tuple[str, str],
) -> str:
    command = "python benchmarks/bench_data.py" + (" --quick" if settings.quick else "")
    shape = "x".join(map(str, CLINICAL_SHAPE))
    return f"""{DOC_HEADING}

Generated by `{command}` on {dt.date.today().isoformat()}; machine:
{machine("ray", "pyarrow", "torch")}.
Total run {seconds:.0f}s; load average (1 min) {load[0]} at start, {load[1]} at end.

Settings: patch {settings.patch}^3 float32, batch {settings.batch}; a patch is a
(`source`, `target`) pair (2 x {settings.patch**3 * 4 / 2**20:.2f} MiB) for every method.
{settings.subjects} phantom subjects of {shape} voxels at
{"x".join(map(str, CLINICAL_SPACING))} mm, resampled to {"x".join(map(str, SHARD_SPACING))} mm;
{run_patches(settings)} train patches in {settings.subjects} Parquet shards (row groups of
{settings.row_group}, uncompressed, with the unread `truth`/`labels` columns as `ctray data
build` writes them). One untimed warm-up epoch per Ray/pyarrow method, then
{settings.repeats} interleaved rounds: each round times one epoch of pyarrow, the headline,
NIfTI, then the other Ray rows (NIfTI only in the first
{settings.nifti_repeats} round(s), {settings.nifti_batches} batch(es) per epoch,
{settings.nifti_workers} DataLoader workers, each sample decoding two {shape} `.nii.gz`).
`ray.init(num_cpus=8)`; all files in the page cache.

{table(results)}

`{result}` (a = Ray Data streaming from Parquet as a `ctray.train` worker reads it; b = NIfTI +
MONAI; c = pyarrow).

{notes}
"""


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (~2 minutes idle)")
    parser.add_argument("--patch", type=int, default=64, help="cubic patch edge (voxels)")
    parser.add_argument("--batch", type=int, default=8, help="patches per batch")
    parser.add_argument("--patches", type=int, help="train patches in the shards")
    parser.add_argument("--repeats", type=int, help="timed rounds (epochs per method)")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown to update")
    parser.add_argument("--no-doc", action="store_true", help="do not update the markdown")
    args = parser.parse_args(argv)
    base = Settings(patches=128, repeats=2, nifti_repeats=1) if args.quick else Settings()
    settings = Settings(
        patch=args.patch,
        batch=args.batch,
        patches=args.patches or base.patches,
        subjects=base.subjects,
        repeats=args.repeats or base.repeats,
        nifti_batches=base.nifti_batches,
        nifti_repeats=min(base.nifti_repeats, args.repeats or base.nifti_repeats),
        row_group=base.row_group,
        quick=args.quick,
    )
    return settings, None if args.no_doc else args.doc


def main(argv: Sequence[str] | None = None) -> int:
    settings, doc = parse_args(argv)
    started = time.perf_counter()
    load_start = load_average()
    print(f"load average (1 min) at start: {load_start}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="ctray-bench-data-"))
    try:
        print(f"building {settings.subjects} clinical-size phantoms under {root} ...", flush=True)
        subjects = make_data(root, settings)
        files = [str(s.shard) for s in subjects]
        print(f"data ready after {time.perf_counter() - started:.0f}s", flush=True)

        start_ray()
        patches = run_patches(settings)
        arrow = Method(
            name="pyarrow iter_batches -> torch.from_numpy",
            epoch=lambda: arrow_epoch(files, settings.batch),
            repeats=settings.repeats,
            patches=patches,
            note="ceiling c",
            cpu_clock=time.process_time,  # one process; the Ray session's daemons are not its
        )
        nifti = Method(
            name="nii.gz + MONAI transforms per sample",
            epoch=lambda: nifti_epoch(subjects, settings),
            repeats=settings.nifti_repeats,
            patches=settings.batch * settings.nifti_batches,
            note=f"baseline b; {settings.nifti_workers} DataLoader workers",
            warm_up=False,  # seconds per sample; every epoch starts its own workers anyway
        )
        stream = ray_method(files, STREAM, settings)
        rest = (BEFORE, BEFORE_TRAIN, REBUILT, MATERIALIZED, V2_DEFAULTS, *VARIANTS)
        others = [ray_method(files, m, settings) for m in rest]
        run_rounds([arrow, stream, nifti, *others])
    finally:
        stop_ray()  # before the report, so no late raylet warning follows the RESULT line
        shutil.rmtree(root, ignore_errors=True)

    ray_rows = [m.measurement() for m in (stream, *others)]
    nifti_m, arrow_m = nifti.measurement(), arrow.measurement()
    results = [*ray_rows, nifti_m, arrow_m]
    result = result_line(ray_rows[0], nifti_m, arrow_m)
    seconds = time.perf_counter() - started
    load = (load_start, load_average())
    notes = analysis(results, nifti_m, arrow_m, load)
    print(f"load average (1 min) at end: {load[1]}")
    print()
    print(table(results))
    print()
    print(notes)
    if doc is not None:
        write_doc(doc, DOC_HEADING, doc_section(settings, results, result, notes, seconds, load))
        print(f"\nwrote {doc}")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
