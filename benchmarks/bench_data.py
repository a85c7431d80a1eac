"""Data-loading throughput: Ray Data over Parquet shards vs per-sample NIfTI + MONAI vs pyarrow.

Three ways to feed a training loop with batches of ``B`` (source, target) patch pairs of
``P^3`` float32 voxels, all from the same clinical-size phantoms (256x256x128 voxels at
1.5x1.5x2.5 mm, resampled to the shard spacing):

(a) Ray Data, as the train workers do: ``ray.data.read_parquet(files, columns=[...])`` then
    ``iter_torch_batches(batch_size=B)``; measured streaming from Parquet every epoch (the
    headline) and over a dataset materialized once in the object store, plus the tuning
    variants listed in ``RAY_VARIANTS``.
(b) the seeds' way: every sample decodes two ``.nii.gz`` volumes and runs MONAI
    ``LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd -> ScaleIntensityRanged
    -> RandSpatialCropd``; samples come from a ``torch.utils.data.DataLoader`` with one worker
    per core and are stacked to ``B`` with ``torch.stack``.
(c) the ceiling: a raw pyarrow read of the same shards (``ParquetFile.iter_batches``,
    ``to_numpy_ndarray`` without copying, ``torch.from_numpy``).

Usage::

    python benchmarks/bench_data.py [--quick] [--patch 64] [--batch 8] [--patches N]
                                    [--repeats R] [--doc docs/benchmarks.md | --no-doc]

The last line printed is ``RESULT ray_vs_nifti=<a/b> ray_vs_arrow=<a/c>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ctray.data.build import crop, prepare
from ctray.data.nifti import HUWindow, Volume, save_nifti
from ctray.data.phantom import PhantomConfig, make_phantom
from ctray.data.shards import rows_to_table, write_table_atomic

REPO = Path(__file__).resolve().parents[1]
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
        nifti_repeats: timed NIfTI epochs.
        nifti_workers: DataLoader worker processes for the NIfTI pipeline.
        row_group: rows per Parquet row group in the shards.
        variants: also measure the Ray Data tuning variants.
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
    variants: bool = True
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
    """Patches per second of one method over its timed repeats."""

    method: str
    rates: list[float]
    patches: int
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def row(self) -> str:
        return (
            f"| {self.method} | {self.median:,.1f} | {min(self.rates):,.1f} | "
            f"{max(self.rates):,.1f} | {len(self.rates)} | {self.patches} | {self.note} |"
        )


def timed(run: Callable[[], int], repeats: int) -> list[float]:
    """Call ``run`` (which returns the patches it delivered) ``repeats`` times; patches/s each."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        rates.append(count / (time.perf_counter() - start))
    return rates


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


@dataclass(frozen=True, kw_only=True)
class RayVariant:
    """One way of configuring the Ray Data read and iteration.

    Attributes:
        name: table label.
        read: extra ``read_parquet`` arguments (e.g. ``override_num_blocks``).
        iterate: extra ``iter_torch_batches`` / ``iter_batches`` arguments.
        context: ``DataContext`` attributes set while the dataset is built and iterated.
        env: environment variables set while the dataset is built (read by Ray's driver).
        batch_format: ``"torch"`` uses ``iter_torch_batches``; ``"numpy"``/``"pyarrow"`` use
            ``iter_batches`` and convert with ``torch.from_numpy``.
        materialize: read once into the object store, then time iterations over it.
        note: table note.
    """

    name: str
    read: dict[str, Any] = field(default_factory=dict)
    iterate: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    batch_format: str = "torch"
    materialize: bool = False
    note: str = ""


V1 = {"use_datasource_v2": False}
ONE_FOOTER_ACTOR = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}
TUNED_READ = {"override_num_blocks": 8}
HEADLINE = RayVariant(
    name="ray stream, defaults (as ctray.train)", note="headline a: read_parquet per epoch"
)
TUNED = RayVariant(
    name="ray stream, V1 reader + override_num_blocks=8",
    read=TUNED_READ,
    context=V1,
    note="best streaming setting found",
)
MATERIALIZED = RayVariant(
    name="ray materialized, defaults", materialize=True, note="as ctray.tune (epoch >= 2)"
)
RAY_VARIANTS = (
    RayVariant(
        name="ray stream, 1 Parquet footer actor",
        env=ONE_FOOTER_ACTOR,
        note="RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1",
    ),
    RayVariant(name="ray stream, V1 reader", context=V1, note="use_datasource_v2=False"),
    TUNED,
    RayVariant(
        name="ray stream, V1 + blocks=8 + prefetch_batches=4",
        read=TUNED_READ,
        context=V1,
        iterate={"prefetch_batches": 4},
    ),
    RayVariant(
        name="ray stream, V1 + blocks=8, iter_batches numpy",
        read=TUNED_READ,
        context=V1,
        batch_format="numpy",
    ),
    RayVariant(
        name="ray materialized, iter_batches pyarrow",
        materialize=True,
        batch_format="pyarrow",
        note="to_numpy_ndarray, no copy",
    ),
)


@contextmanager
def configured(variant: RayVariant) -> Iterator[None]:
    """Apply a variant's environment and ``DataContext`` settings, then restore them."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved_env = {k: os.environ.get(k) for k in variant.env}
    saved_ctx = {k: getattr(ctx, k) for k in variant.context}
    os.environ.update(variant.env)
    for key, value in variant.context.items():
        setattr(ctx, key, value)
    try:
        yield
    finally:
        for key, value in saved_ctx.items():
            setattr(ctx, key, value)
        for key, old in saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def ray_dataset(files: Sequence[str], variant: RayVariant) -> Any:
    """``read_parquet`` of the training columns, as ``ctray.train.trainer.datasets`` does."""
    import ray

    with warnings.catch_warnings():  # Ray 2.60 deprecates columns= in favour of select_columns
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.data.read_parquet(list(files), columns=list(COLUMNS), **variant.read)


def ray_epoch(dataset: Any, variant: RayVariant, batch: int) -> int:
    """Iterate one epoch of torch batches and count the patches."""
    count = 0
    if variant.batch_format == "torch":
        for b in dataset.iter_torch_batches(batch_size=batch, **variant.iterate):
            count += _batch_size(b)
        return count
    batches = dataset.iter_batches(
        batch_size=batch, batch_format=variant.batch_format, **variant.iterate
    )
    for b in batches:
        if variant.batch_format == "pyarrow":
            tensors = {k: _tensor(b.column(k)) for k in COLUMNS}
        else:
            tensors = {k: _from_numpy(b[k]) for k in COLUMNS}
        count += _batch_size(tensors)
    return count


def measure_ray(files: Sequence[str], variant: RayVariant, settings: Settings) -> Measurement:
    """Time ``settings.repeats`` epochs of one Ray Data variant."""
    note = variant.note
    with configured(variant):
        if variant.materialize:
            start = time.perf_counter()
            dataset = ray_dataset(files, variant).materialize()
            note = f"{note}; materialize() {time.perf_counter() - start:.1f}s".lstrip("; ")

            def run() -> int:
                return ray_epoch(dataset, variant, settings.batch)
        else:

            def run() -> int:
                return ray_epoch(ray_dataset(files, variant), variant, settings.batch)

        rates = timed(run, settings.repeats)
    return Measurement(method=variant.name, rates=rates, patches=run_patches(settings), note=note)


def run_patches(settings: Settings) -> int:
    return settings.patches_per_subject * settings.subjects


def start_ray(files: Sequence[str], settings: Settings) -> None:
    """One local Ray session with more logical CPUs than cores, progress bars off, warmed up."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    with configured(TUNED):  # untimed: starts the worker processes every variant reuses
        ray_epoch(ray_dataset(files, TUNED), TUNED, settings.batch)


# --------------------------------------------------------------------------- report


def table(results: Sequence[Measurement]) -> str:
    head = (
        "| method | patches/s (median) | min | max | repeats | patches/epoch | notes |\n"
        "|---|---:|---:|---:|---:|---:|---|"
    )
    return "\n".join([head, *(m.row() for m in results)])


def result_line(ray: Measurement, nifti: Measurement, arrow: Measurement) -> str:
    return (
        f"RESULT ray_vs_nifti={ray.median / nifti.median:.2f} "
        f"ray_vs_arrow={ray.median / arrow.median:.2f}"
    )


def machine() -> str:
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import ray

    return (
        f"{platform.machine()}, nproc={os.cpu_count()}, {gib:.0f} GiB RAM, "
        f"Python {platform.python_version()}, ray {ray.__version__}, "
        f"pyarrow {pa.__version__}, torch {torch.__version__}"
    )


def write_doc(path: Path, section: str) -> None:
    """Replace (or append) the ``DOC_HEADING`` section of ``path``, leaving the rest alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(DOC_HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = section.rstrip() + "\n\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


def by_name(results: Sequence[Measurement], variant: RayVariant) -> Measurement | None:
    return next((m for m in results if m.method == variant.name), None)


def analysis(results: Sequence[Measurement], nifti: Measurement, arrow: Measurement) -> str:
    """The notes under the table: shares of the ceiling and what limits Ray Data."""
    lines = ["Share of the pyarrow ceiling (median / median):", ""]
    lines += [
        f"- {m.method}: {m.median / arrow.median:.2f} (vs NIfTI {m.median / nifti.median:.0f}x)"
        for m in results
        if m.method.startswith("ray")
    ]
    head = by_name(results, HEADLINE)
    tuned = by_name(results, TUNED)
    mat = by_name(results, MATERIALIZED)
    assert head is not None
    epoch = head.patches / head.median
    lines += [
        "",
        "What limits Ray Data here:",
        "",
        f"- Defaults (Ray 2.60 routes `read_parquet` through the V2 datasource): every execution "
        f"starts a `ListFiles` step that spawns 32 `FooterReader` actors "
        f"(`RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`, default 32) just to read {len(COLUMNS)} "
        f"columns' footers of a few files, then kills them. On {os.cpu_count()} cores each "
        f"actor is a fresh Python process, so a streamed epoch of {head.patches} patches takes "
        f"{epoch:.1f}s; most of it is listing, not reading. Reading with one footer actor or "
        "with the V1 reader (`DataContext.use_datasource_v2 = False`) removes most of that.",
        "- With few large files the V2/V1 readers make one block per file (read tasks of "
        "~0.5 GiB); `override_num_blocks=8` splits the read into more, smaller tasks that "
        "overlap with iteration.",
        "- Streaming still pays per epoch: task scheduling, one copy of every block into the "
        "object store (the reader process writes it, the trainer process reads it) and the "
        "Arrow -> numpy -> torch conversion; pyarrow reads in-process with no copy beyond the "
        "Parquet decode. `prefetch_batches` and `batch_format` are second-order: batches are "
        "slices of blocks and the conversion is zero-copy for fixed-shape tensors, so their "
        "rows differ by about the run-to-run spread (compare min/max).",
        "- `zero_copy_batch` is a `map_batches` option; Ray 2.60's `iter_batches` / "
        "`iter_torch_batches` have no such argument, so it cannot be measured on this path.",
    ]
    if mat is not None:
        lines.append(
            f"- Materialized once (what `ctray.tune` does), later epochs iterate blocks already "
            f"in shared memory: {mat.median:,.0f} patches/s, {mat.median / arrow.median:.1f}x "
            "the pyarrow re-read (which decodes Parquet every epoch); the first epoch pays "
            "the read (see the note)."
        )
    if tuned is not None:
        lines.append(
            f"- Tuned streaming ({TUNED.name}): ray_vs_arrow={tuned.median / arrow.median:.2f}, "
            f"ray_vs_nifti={tuned.median / nifti.median:.2f}. The RESULT line keeps the "
            "defaults the trainer uses today."
        )
    lines += [
        "- Every figure is from one shared 2-core VM; the load average at start/end is in the "
        "header. pyarrow and NIfTI run first, Ray after them, so a load that changes during "
        "the run moves the ratios; and under load multi-process Ray gets a larger share of "
        "the CPU than single-threaded pyarrow. Trust ratios only from a run whose load "
        "average stayed near or below nproc.",
    ]
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

`{command}` on {dt.date.today().isoformat()}; machine: {machine()}. Total run {seconds:.0f}s;
load average (1 min) {load[0]} at start, {load[1]} at end.

Settings: patch {settings.patch}^3 float32, batch {settings.batch}; a patch is a
(`source`, `target`) pair (2 x {settings.patch**3 * 4 / 2**20:.2f} MiB) for every method.
{settings.subjects} phantom subjects of {shape} voxels at
{"x".join(map(str, CLINICAL_SPACING))} mm, resampled to {"x".join(map(str, SHARD_SPACING))} mm;
{run_patches(settings)} train patches in {settings.subjects} Parquet shards (row groups of
{settings.row_group}, uncompressed, with the unread `truth`/`labels` columns as `ctray data
build` writes them). Ray/pyarrow: {settings.repeats} timed epochs each (after one untimed
warm-up epoch); NIfTI: {settings.nifti_repeats} epochs of {settings.nifti_batches} batch(es),
{settings.nifti_workers} DataLoader workers, each sample decoding two {shape} `.nii.gz`.
`ray.init(num_cpus=8)`; all files in the page cache.

{table(results)}

`{result}` (a = Ray Data streaming from Parquet with the trainer's defaults,
b = NIfTI + MONAI, c = pyarrow).

{notes}
"""


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (~1.5 minutes idle)")
    parser.add_argument("--patch", type=int, default=64, help="cubic patch edge (voxels)")
    parser.add_argument("--batch", type=int, default=8, help="patches per batch")
    parser.add_argument("--patches", type=int, help="train patches in the shards")
    parser.add_argument("--repeats", type=int, help="timed epochs per method")
    parser.add_argument("--no-variants", action="store_true", help="skip Ray tuning variants")
    parser.add_argument(
        "--doc", type=Path, default=REPO / "docs" / "benchmarks.md", help="markdown to update"
    )
    parser.add_argument("--no-doc", action="store_true", help="do not update the markdown")
    args = parser.parse_args(argv)
    if args.quick:
        base = Settings(patches=128, repeats=2, nifti_repeats=1, variants=False)
    else:
        base = Settings()
    settings = Settings(
        patch=args.patch,
        batch=args.batch,
        patches=args.patches or base.patches,
        subjects=base.subjects,
        repeats=args.repeats or base.repeats,
        nifti_batches=base.nifti_batches,
        nifti_repeats=min(base.nifti_repeats, args.repeats or base.nifti_repeats),
        row_group=base.row_group,
        variants=base.variants and not args.no_variants,
        quick=args.quick,
    )
    return settings, None if args.no_doc else args.doc


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    settings, doc = parse_args(argv)
    started = time.perf_counter()
    load_start = load_average()
    root = Path(tempfile.mkdtemp(prefix="ctray-bench-data-"))
    try:
        print(f"building {settings.subjects} clinical-size phantoms under {root} ...", flush=True)
        subjects = make_data(root, settings)
        files = [str(s.shard) for s in subjects]
        print(f"data ready after {time.perf_counter() - started:.0f}s", flush=True)

        arrow_epoch(files, settings.batch)  # warm-up
        arrow = Measurement(
            method="pyarrow iter_batches -> torch.from_numpy",
            rates=timed(lambda: arrow_epoch(files, settings.batch), settings.repeats),
            patches=run_patches(settings),
            note="ceiling c",
        )
        print(arrow.row(), flush=True)
        nifti = Measurement(
            method="nii.gz + MONAI transforms per sample",
            rates=timed(lambda: nifti_epoch(subjects, settings), settings.nifti_repeats),
            patches=settings.batch * settings.nifti_batches,
            note=f"baseline b; {settings.nifti_workers} DataLoader workers",
        )
        print(nifti.row(), flush=True)

        start_ray(files, settings)
        variants = [HEADLINE, MATERIALIZED, *(RAY_VARIANTS if settings.variants else ())]
        results = []
        for variant in variants:
            results.append(measure_ray(files, variant, settings))
            print(results[-1].row(), flush=True)
        results += [nifti, arrow]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    head = results[0]
    result = result_line(head, nifti, arrow)
    seconds = time.perf_counter() - started
    print()
    print(table(results))
    print()
    print(analysis(results, nifti, arrow))
    if doc is not None:
        load = (load_start, load_average())
        section = doc_section(
            settings, results, result, analysis(results, nifti, arrow), seconds, load
        )
        write_doc(doc, section)
        print(f"\nwrote {doc}")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
