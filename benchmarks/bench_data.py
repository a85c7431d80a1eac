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
    subjects: int = 4
    repeats: int = 5
    nifti_batches: int = 2
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


def make_data(root: Path, settings: Settings) -> list[Subject]:
    """Write the clinical-size NIfTI pairs and the Parquet shards cut from the same phantoms."""
    config = PhantomConfig(shape=CLINICAL_SHAPE, spacing=CLINICAL_SPACING)
    subjects = []
    for k in range(settings.subjects):
        name = f"phantom-{k:03d}"
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
        subjects.append(subject)
    return subjects


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
    items = [
        {"source": str(s.source_nii), "target": str(s.target_nii)}
        for s in subjects
    ]
    data = Dataset(data=[items[i % len(items)] for i in range(count)], transform=monai_pipeline(
        settings.patch
    ))
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


def _tensor(column: pa.Array | pa.ChunkedArray) -> torch.Tensor:
    """A fixed-shape tensor column as a torch tensor without copying."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    with warnings.catch_warnings():  # Arrow buffers are read-only; nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(column.to_numpy_ndarray())


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
    """One way of configuring the Ray Data read and iteration."""

    name: str
    read: dict[str, Any] = field(default_factory=dict)
    iterate: dict[str, Any] = field(default_factory=dict)
    materialize: bool = False
    numpy: bool = False
    note: str = ""


HEADLINE = RayVariant(name="ray stream (read_parquet -> iter_torch_batches)", note="headline a")
MATERIALIZED = RayVariant(
    name="ray materialized (iterate object store)",
    materialize=True,
    note="train loop from epoch 2",
)
RAY_VARIANTS = (
    RayVariant(name="ray stream, prefetch_batches=4", iterate={"prefetch_batches": 4}),
    RayVariant(name="ray stream, prefetch_batches=0", iterate={"prefetch_batches": 0}),
    RayVariant(name="ray stream, override_num_blocks=2", read={"override_num_blocks": 2}),
    RayVariant(
        name="ray stream, iter_batches numpy zero_copy",
        numpy=True,
        iterate={"zero_copy_batch": True},
    ),
    RayVariant(
        name="ray materialized, iter_batches numpy zero_copy",
        materialize=True,
        numpy=True,
        iterate={"zero_copy_batch": True},
    ),
)


def ray_dataset(files: Sequence[str], variant: RayVariant) -> Any:
    """``read_parquet`` of the training columns, as ``ctray.train.trainer.datasets`` does."""
    import ray

    return ray.data.read_parquet(list(files), columns=list(COLUMNS), **variant.read)


def ray_epoch(dataset: Any, variant: RayVariant, batch: int) -> int:
    """Iterate one epoch of torch (or numpy -> torch) batches and count the patches."""
    count = 0
    if variant.numpy:
        for b in dataset.iter_batches(batch_size=batch, batch_format="numpy", **variant.iterate):
            tensors = {k: torch.from_numpy(np.asarray(b[k])) for k in COLUMNS}
            count += _batch_size(tensors)
        return count
    for b in dataset.iter_torch_batches(batch_size=batch, **variant.iterate):
        count += _batch_size(b)
    return count


def measure_ray(files: Sequence[str], variant: RayVariant, settings: Settings) -> Measurement:
    """Time ``settings.repeats`` epochs of one Ray Data variant (after one untimed warm-up)."""
    note = variant.note
    if variant.materialize:
        start = time.perf_counter()
        dataset = ray_dataset(files, variant).materialize()
        note = f"{note}; materialize() took {time.perf_counter() - start:.1f}s".lstrip("; ")

        def run() -> int:
            return ray_epoch(dataset, variant, settings.batch)
    else:

        def run() -> int:
            return ray_epoch(ray_dataset(files, variant), variant, settings.batch)

    patches = run()  # warm-up: worker processes, imports
    return Measurement(
        method=variant.name, rates=timed(run, settings.repeats), patches=patches, note=note
    )


def start_ray() -> None:
    """One local Ray session with more logical CPUs than cores, progress bars off."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


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


def doc_section(
    settings: Settings, results: Sequence[Measurement], result: str, notes: str, seconds: float
) -> str:
    command = "python benchmarks/bench_data.py" + (" --quick" if settings.quick else "")
    return f"""{DOC_HEADING}

`{command}` on {dt.date.today().isoformat()}; machine: {machine()}. Total run {seconds:.0f}s.

Settings: patch {settings.patch}^3 float32, batch {settings.batch}, each patch a
(`source`, `target`) pair (2 x {settings.patch**3 * 4 / 2**20:.2f} MiB);
{settings.subjects} phantom subjects of {"x".join(map(str, CLINICAL_SHAPE))} voxels at
{"x".join(map(str, CLINICAL_SPACING))} mm, resampled to {"x".join(map(str, SHARD_SPACING))} mm;
{settings.patches_per_subject * settings.subjects} train patches in
{settings.subjects} Parquet shards (row groups of {settings.row_group}, uncompressed, with the
unread `truth`/`labels` columns too); Ray/pyarrow: {settings.repeats} timed epochs after one
warm-up; NIfTI: {settings.nifti_repeats} epochs of {settings.nifti_batches} batches,
{settings.nifti_workers} DataLoader workers. `ray.init(num_cpus=8)`; files in the page cache.

{table(results)}

`{result}` (a = Ray Data streaming from Parquet, b = NIfTI + MONAI, c = pyarrow).

{notes}
"""


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (~1 minute)")
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
        base = Settings(
            patches=128, subjects=2, repeats=3, nifti_batches=1, nifti_repeats=1, variants=False
        )
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


def main(argv: Sequence[str] | None = None) -> int:
    settings, doc = parse_args(argv)
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="ctray-bench-data-"))
    try:
        print(f"building {settings.subjects} clinical-size phantoms under {root} ...", flush=True)
        subjects = make_data(root, settings)
        files = [str(s.shard) for s in subjects]
        print(f"data ready after {time.perf_counter() - started:.0f}s", flush=True)

        arrow_epoch(files, settings.batch)  # warm-up (page cache)
        arrow = Measurement(
            method="pyarrow iter_batches -> torch.from_numpy",
            rates=timed(lambda: arrow_epoch(files, settings.batch), settings.repeats),
            patches=settings.patches_per_subject * settings.subjects,
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

        start_ray()
        results = [measure_ray(files, HEADLINE, settings)]
        print(results[-1].row(), flush=True)
        for variant in (MATERIALIZED, *(RAY_VARIANTS if settings.variants else ())):
            results.append(measure_ray(files, variant, settings))
            print(results[-1].row(), flush=True)
        results += [nifti, arrow]
        ray_row = results[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    result = result_line(ray_row, nifti, arrow)
    seconds = time.perf_counter() - started
    print()
    print(table(results))
    if doc is not None:
        write_doc(doc, doc_section(settings, results, result, notes(results, arrow), seconds))
        print(f"\nwrote {doc}")
    print(result)
    return 0


def notes(results: Sequence[Measurement], arrow: Measurement) -> str:
    """Per-variant share of the pyarrow ceiling (the analysis text lives in the doc)."""
    lines = ["Share of the pyarrow ceiling per Ray Data variant:", ""]
    for m in results:
        if m.method.startswith("ray"):
            lines.append(f"- {m.method}: {m.median / arrow.median:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
