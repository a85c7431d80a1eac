"""The family-independent part of `ctray data build`: splits, patches, incremental shard writes.

A family turns its inputs into :class:`SubjectSource` objects (a name, the files it came from
with checksums, and a function that produces the subject's patch rows); :func:`build_shards`
assigns splits, writes one Parquet file per subject, reuses subjects whose inputs and settings
are unchanged since the last build, and records every skipped input with its reason in the
manifest and in a build report that is written even when the build fails.

A build goes from the previous state to the new one in one step: its shards get new file names
(the build generation), the manifest is replaced last, and the previous generation's files are
removed only after that. A build that fails at any point leaves the previous manifest and every
shard it lists as they were.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ctray.config import to_dict
from ctray.data.nifti import NiftiError, Volume, canonical_ras, resample_to_spacing
from ctray.data.phantom import PhantomConfig
from ctray.data.shards import (
    MANIFEST,
    SPLITS,
    InputRecord,
    Manifest,
    describe_columns,
    load_manifest,
    rows_to_table,
    shard_problem,
    write_table_atomic,
)
from ctray.files import atomic_write_bytes

log = logging.getLogger(__name__)

Row = dict[str, Any]
REPORT = "build-report.json"
MAX_SUBJECT_BYTES = 200
# ':' too: on Windows "C:x" is a path on drive C.
_SEPARATORS = frozenset("/\\:")


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """Settings shared by every family's shard build (recorded in the manifest).

    Attributes:
        patch_size: voxels per patch (x, y, z) after resampling.
        spacing: target voxel size in mm (canonical RAS).
        window_lo / window_hi: the HU window mapped to [0, 1]; stored, never implicit.
        patches_per_subject: patch origins drawn per subject.
        val_fraction: share of subjects held out for validation (at least one).
        seed: makes patch positions, splits' tie-breaks and simulations reproducible.
        strict: turn a skipped input into an error instead of a manifest entry.
        resize_inplane: 2D slice families (patch_size (H, W, 1)): slices are resized in-plane to
            (H, W) and z keeps the input's slices, instead of resampling to ``spacing``;
            inference reads it back (DataInfo.resize_inplane).
        output_scale: the output grid rule of families whose output is finer than their input
            (slice_ldm: (1, 1, factor)); ``patch_size`` and ``spacing`` describe the input.
            Inference reads it back (DataInfo.output_scale).
    """

    patch_size: tuple[int, int, int] = (32, 32, 32)
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    window_lo: float = -1000.0
    window_hi: float = 1000.0
    patches_per_subject: int = 8
    val_fraction: float = 0.25
    seed: int = 0
    strict: bool = False
    resize_inplane: bool = False
    output_scale: tuple[int, int, int] = (1, 1, 1)

    @property
    def window(self) -> dict[str, float]:
        return {"lo": self.window_lo, "hi": self.window_hi}


@dataclass(kw_only=True)
class SubjectSource:
    """One subject to build: where it came from and how to make its rows.

    ``make_rows(rng, split)`` returns the patch rows and the manifest statistics (shape,
    spacing, hu); it raises NiftiError or ValueError for an input that must be skipped.
    ``split`` fixes the subject's split (e.g. a user's own test folder); None lets
    :func:`assign_splits` decide. Once any source fixes its split, the others train.
    """

    subject: str
    paths: dict[str, str]
    checksums: dict[str, str]
    make_rows: Callable[[np.random.Generator, str], tuple[list[Row], dict[str, Any]]]
    split: str | None = None


class BuildError(RuntimeError):
    """A build cannot produce a usable dataset (no inputs, too few subjects, strict skip).

    Its message ends with every input the build skipped and where its report was written, so
    the user sees why the inputs did not suffice even though no manifest was written.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.skipped: list[dict[str, str]] = []
        self.kept: str = ""
        self.report: Path | None = None

    def __str__(self) -> str:
        lines = [self.args[0]]
        if self.skipped:
            lines.append(f"{len(self.skipped)} input(s) skipped:")
            lines += [f"  {s['path']}: {s['reason']}" for s in self.skipped]
        if self.kept:
            lines.append(self.kept)
        if self.report is not None:
            lines.append(f"build report: {self.report}")
        return "\n".join(lines)


def subject_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a subject's shard file (None when it can).

    Subject names come from CSV cells and file or folder names and become file names under the
    output folder, so nothing in them may lead elsewhere (``..``, separators, absolute paths),
    hide the file, or be unrepresentable on a file system.
    """
    if not name:
        return "is empty"
    bad = sorted({c for c in name if c in _SEPARATORS or unicodedata.category(c) == "Cc"})
    if bad:
        return f"contains {', '.join(repr(c) for c in bad)} (path separators, control characters)"
    if name.startswith("."):
        return "starts with '.' (a hidden file, or a path such as '..')"
    if len(name.encode()) > MAX_SUBJECT_BYTES:
        return f"is longer than {MAX_SUBJECT_BYTES} bytes"
    return None


def phantom_sources(
    count: int,
    rows: Callable[[int, str, np.random.Generator, str], tuple[list[Row], dict[str, Any]]],
    *,
    version: str,
) -> list[SubjectSource]:
    """Sources for ``count`` phantom demo subjects (``phantom-000`` ...).

    ``rows(seed, subject, rng, split)`` makes a subject's rows; ``version`` names the family's
    phantom recipe, so changing the recipe changes the checksums and rebuilds the shards.
    """
    sources = []
    for k in range(count):
        key = hashlib.sha256(f"{version}:{PhantomConfig()}:{k}".encode()).hexdigest()
        sources.append(
            SubjectSource(
                subject=f"phantom-{k:03d}",
                paths={"phantom": f"phantom:seed={k}"},
                checksums={"phantom": key},
                make_rows=functools.partial(rows, k, f"phantom-{k:03d}"),
            )
        )
    return sources


def prepare(vol: Volume, spacing: Sequence[float], *, mode: str = "bilinear") -> Volume:
    """Canonical RAS orientation, then resampling to the build spacing."""
    ras, _ = canonical_ras(vol)
    return resample_to_spacing(ras, spacing, mode=mode)


def pad_to(array: np.ndarray, size: Sequence[int], value: float) -> np.ndarray:
    """Pad (at the far end) so every axis is at least ``size``; small scans still give patches."""
    pad = [(0, max(0, s - n)) for n, s in zip(array.shape, size, strict=True)]
    return np.pad(array, pad, constant_values=value) if any(p[1] for p in pad) else array


def sample_origins(
    mask: np.ndarray,
    patch: Sequence[int],
    count: int,
    rng: np.random.Generator,
    *,
    z_range: tuple[int, int] | None = None,
) -> list[tuple[int, int, int]]:
    """Patch corners whose centre lies inside ``mask`` (and the z range, if it fits a patch)."""
    limits = [n - p for n, p in zip(mask.shape, patch, strict=True)]
    if min(limits) < 0:
        raise ValueError(f"volume {mask.shape} is smaller than the patch {tuple(patch)}")
    lo_z, hi_z = 0, limits[2]
    if z_range is not None and z_range[1] - z_range[0] >= patch[2]:
        lo_z, hi_z = z_range[0], z_range[1] - patch[2]
    half = np.asarray(patch) // 2
    centres = np.argwhere(mask)
    corners = centres - half
    ok = (
        (corners[:, 0] >= 0)
        & (corners[:, 0] <= limits[0])
        & (corners[:, 1] >= 0)
        & (corners[:, 1] <= limits[1])
        & (corners[:, 2] >= lo_z)
        & (corners[:, 2] <= hi_z)
    )
    corners = corners[ok]
    if len(corners) == 0:
        corners = np.array([[limits[0] // 2, limits[1] // 2, (lo_z + hi_z) // 2]])
    picks = rng.choice(len(corners), size=count, replace=len(corners) < count)
    return [tuple(int(v) for v in corners[i]) for i in picks]


def crop(array: np.ndarray, origin: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """The patch of ``array`` starting at ``origin`` (a contiguous copy)."""
    sl = tuple(slice(o, o + p) for o, p in zip(origin, patch, strict=True))
    return np.ascontiguousarray(array[sl])


def hu_stats(array: np.ndarray) -> dict[str, float]:
    return {
        "min": float(array.min()),
        "max": float(array.max()),
        "mean": float(array.mean()),
        "std": float(array.std()),
    }


def assign_splits(subjects: Sequence[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Stable subject-level split: the same subjects land in the same split on every re-run.

    ``val_fraction >= 1`` makes evaluation-only shards: every subject is held out (for
    ``ctray evaluate`` of a trained model on scans it never saw).
    """
    if val_fraction >= 1.0:
        return dict.fromkeys(subjects, "val")
    if len(subjects) < 2:
        raise BuildError(
            f"need at least 2 subjects for a train/val split, got {len(subjects)}; add inputs, "
            "draw several simulations per native scan (phase_gan: --option simulations=K), or, "
            "for `ctray evaluate` only, hold every subject out (--val-fraction 1)"
        )
    ranked = sorted(subjects, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n_val = min(len(subjects) - 1, max(1, round(val_fraction * len(subjects))))
    return {s: ("val" if i < n_val else "train") for i, s in enumerate(ranked)}


def _splits(sources: Sequence[SubjectSource], config: BuildConfig) -> dict[str, str]:
    """Fixed splits where sources give one (the rest train), else a stable random split."""
    fixed = {s.subject: s.split for s in sources if s.split is not None}
    bad = sorted({v for v in fixed.values() if v not in SPLITS})
    if bad:
        raise BuildError(f"unknown split(s) {bad}; valid: {', '.join(SPLITS)}")
    if not fixed:
        return assign_splits([s.subject for s in sources], config.val_fraction, config.seed)
    return {s.subject: fixed.get(s.subject, "train") for s in sources}


def _usable_names(
    sources: Sequence[SubjectSource], skipped: list[dict[str, str]]
) -> list[SubjectSource]:
    """Sources whose subject names are safe, distinct file names; the others go to ``skipped``.

    Names are compared case-insensitively: on macOS and Windows "A" and "a" are one file.
    """
    kept: dict[str, SubjectSource] = {}
    for source in sources:
        path = next(iter(source.paths.values()), source.subject)
        problem = subject_name_error(source.subject)
        if problem is not None:
            skipped.append({"path": path, "reason": f"subject name {source.subject!r} {problem}"})
            continue
        first = kept.get(source.subject.casefold())
        if first is not None:
            other = next(iter(first.paths.values()), first.subject)
            reason = f"duplicate subject {source.subject!r} (also from {other})"
            skipped.append({"path": path, "reason": reason})
            continue
        kept[source.subject.casefold()] = source
    return list(kept.values())


def _previous(out: Path) -> Manifest | None:
    try:
        return load_manifest(out)
    except FileNotFoundError:
        return None


def _landed(out: Path, manifest: Manifest) -> bool:
    """Whether ``manifest`` is the one on disk (an interruption can come just after the swap)."""
    try:
        on_disk = load_manifest(out)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (on_disk.generation, on_disk.created) == (manifest.generation, manifest.created)


def _reusable(
    old: Manifest | None, out: Path, source: SubjectSource, split: str
) -> InputRecord | None:
    """The previous build's record of ``source`` when its shard can stand unchanged."""
    if old is None:
        return None
    for rec in old.inputs:
        if (
            rec.subject == source.subject
            and rec.checksums == source.checksums
            and rec.split == split
            and shard_problem(out / rec.shard, rec.shard_bytes) is None
        ):
            size = (out / rec.shard).stat().st_size
            return dataclasses.replace(rec, paths=source.paths, shard_bytes=size)
    return None


def _fill(
    manifest: Manifest,
    *,
    out: Path,
    sources: Sequence[SubjectSource],
    old: Manifest | None,
    config: BuildConfig,
    written: list[Path],
    progress: bool,
) -> int:
    """Add every source's record to ``manifest``, writing new shards; returns how many were reused.

    New shard paths are appended to ``written`` before they are written, so a failure can
    remove them.
    """
    if config.strict and manifest.skipped:
        raise BuildError(f"--strict: {len(manifest.skipped)} input(s) are not usable")
    if not sources:
        raise BuildError("no usable inputs")
    splits = _splits(sources, config)
    reused = 0
    for source in tqdm(
        sources, desc=f"building {manifest.family} shards", unit="subject", disable=not progress
    ):
        split = splits[source.subject]
        rec = _reusable(old, out, source, split)
        if rec is not None:
            manifest.inputs.append(rec)
            manifest.columns = old.columns if old else manifest.columns
            reused += 1
            continue
        seed = int(hashlib.sha256(f"{config.seed}:{source.subject}".encode()).hexdigest()[:8], 16)
        try:
            rows, stats = source.make_rows(np.random.default_rng(seed), split)
        except (NiftiError, ValueError) as err:
            reason = err.reason if isinstance(err, NiftiError) else str(err)
            if config.strict:
                raise BuildError(f"{source.subject}: {reason}") from err
            path = next(iter(source.paths.values()), source.subject)
            if isinstance(err, NiftiError) and err.path in source.paths.values():
                path = err.path  # the file at fault (e.g. the B of an A/B pair)
            manifest.skipped.append({"path": path, "reason": reason})
            log.warning("skipped %s: %s", path, reason)
            continue
        shard = f"{split}/{source.subject}.g{manifest.generation}.parquet"
        table = rows_to_table(rows)
        written.append(out / shard)
        try:
            write_table_atomic(table, out / shard)
        except OSError as err:
            raise BuildError(f"cannot write shard {out / shard}: {err.strerror or err}") from err
        manifest.columns = describe_columns(table)
        manifest.inputs.append(
            InputRecord(
                subject=source.subject,
                paths=source.paths,
                checksums=source.checksums,
                split=split,
                shard=shard,
                rows=len(rows),
                shard_bytes=(out / shard).stat().st_size,
                **stats,
            )
        )
    needed = ("val",) if config.val_fraction >= 1.0 else SPLITS
    for split in needed:
        if not any(r.split == split for r in manifest.inputs):
            raise BuildError(f"no usable subject left for the {split!r} split")
    return reused


def _remove_unlisted(out: Path, manifest: Manifest) -> None:
    """Delete shards (and temporary files of interrupted builds) the manifest does not list."""
    keep = {out / r.shard for r in manifest.inputs}
    for split in SPLITS:
        for path in (*(out / split).glob("*.parquet"), *(out / split).glob(".*.tmp")):
            if path not in keep:
                try:
                    path.unlink()
                except OSError as err:  # the new build stands; a leftover file is harmless
                    log.warning("could not remove %s: %s", path, err)


def _write_report(
    out: Path, *, manifest: Manifest, error: BaseException | None, current: Manifest | None
) -> Path | None:
    """Write ``DIR/build-report.json``; None when even that fails (e.g. the disk is full)."""
    report = {
        "status": "failed" if error else "ok",
        "error": None if error is None else str(error) or type(error).__name__,
        "created": time.time(),
        "family": manifest.family,
        "generation": manifest.generation,
        "counts": None if error else manifest.counts,
        "skipped": manifest.skipped,
        # What manifest.json describes now: the new build, or after a failure the previous one.
        "manifest": None
        if current is None
        else {"fingerprint": current.fingerprint, "generation": current.generation},
    }
    try:
        return atomic_write_bytes(out / REPORT, json.dumps(report, indent=2).encode())
    except OSError as err:
        log.warning("could not write the build report %s: %s", out / REPORT, err)
        return None


def build_shards(
    *,
    family: str,
    out: str | Path,
    sources: Sequence[SubjectSource],
    skipped: list[dict[str, str]],
    config: BuildConfig,
    family_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Manifest:
    """Write (or update) a shard directory and its manifest; returns the manifest.

    Inputs that fail validation are skipped and recorded (or raise with ``config.strict``).
    On any failure the previous manifest and its shards stay as they were, this build's new
    files are removed, and the report lists every skipped input.

    Raises:
        BuildError: no usable dataset, a strict skip, or a shard or the manifest could not be
            written (e.g. the disk is full).
    """
    out = Path(out)
    build = {"family_options": dict(family_options or {}), **to_dict(config)}
    previous = _previous(out)
    old = previous if previous and (previous.family, previous.build) == (family, build) else None
    manifest = Manifest(
        family=family,
        build=build,
        patch_size=list(config.patch_size),
        spacing=list(config.spacing),
        window=config.window,
        skipped=list(skipped),
        generation=(previous.generation if previous else 0) + 1,
    )
    written: list[Path] = []
    try:
        sources = _usable_names(sources, manifest.skipped)
        reused = _fill(
            manifest,
            out=out,
            sources=sources,
            old=old,
            config=config,
            written=written,
            progress=progress,
        )
        try:
            manifest.save(out)
        except OSError as err:
            raise BuildError(f"cannot write {out / MANIFEST}: {err.strerror or err}") from err
    except BaseException as err:
        if _landed(out, manifest):  # the new build stands; its files must stay
            raise
        for path in written:
            path.unlink(missing_ok=True)
        report = _write_report(out, manifest=manifest, error=err, current=previous)
        if isinstance(err, BuildError):
            err.skipped = manifest.skipped
            err.report = report
            err.kept = (
                f"{out / MANIFEST} is unchanged: it still describes the previous build"
                if previous
                else f"{out} holds no build"
            )
        raise
    _remove_unlisted(out, manifest)
    _write_report(out, manifest=manifest, error=None, current=manifest)
    log.info(
        "built %s: %s rows, %d reused, %d skipped",
        out,
        manifest.counts,
        reused,
        len(manifest.skipped),
    )
    return manifest
