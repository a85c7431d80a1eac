"""Parquet shards of fixed-shape patches, plus the manifest that describes them.

Layout of a built data directory::

    DIR/manifest.json                  fingerprint, geometry, window, inputs, skipped, counts
    DIR/train/<subject>.g<N>.parquet   one file per input subject (so a re-run rebuilds only
    DIR/val/<subject>.g<N>.parquet     changes), N the build generation that wrote it
    DIR/build-report.json              what the last build attempt did (also when it failed)

A build never writes to a file the current manifest lists: new shards get the new generation's
name, the manifest is swapped in last, and only then are unlisted shards removed. Readers use
only the files the manifest lists and refuse one whose size differs from the recorded size.

Tensor columns use Arrow's canonical ``arrow.fixed_shape_tensor`` extension type, which
pyarrow, Ray Data and other readers decode without copying into Python objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctray.files import atomic_write_bytes

MANIFEST = "manifest.json"
FORMAT = "ctray-shards/1"
SPLITS = ("train", "val")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Content checksum of an input file, to detect unchanged inputs on re-runs."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tensor_array(arrays: np.ndarray) -> pa.ExtensionArray:
    """A (N, *shape) numpy array as an Arrow fixed-shape tensor column (no per-row objects)."""
    arrays = np.ascontiguousarray(arrays)
    shape = arrays.shape[1:]
    storage = pa.FixedSizeListArray.from_arrays(pa.array(arrays.reshape(-1)), int(np.prod(shape)))
    return pa.ExtensionArray.from_storage(
        pa.fixed_shape_tensor(pa.from_numpy_dtype(arrays.dtype), list(shape)), storage
    )


def column_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Decode a column back to numpy; tensor columns become (N, *shape) arrays."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_numpy_ndarray()
    return column.to_numpy(zero_copy_only=False)


def rows_to_table(rows: list[Mapping[str, Any]]) -> pa.Table:
    """Stack row dicts (numpy arrays and scalars) into an Arrow table with typed columns."""
    columns: dict[str, pa.Array] = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], np.ndarray):
            columns[key] = tensor_array(np.stack(values))
        else:
            columns[key] = pa.array(values)
    return pa.table(columns)


def write_table_atomic(table: pa.Table, path: str | Path, *, row_group_size: int = 64) -> Path:
    """Write a Parquet file under a temporary name, then rename: never a half-written shard."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="none")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass(kw_only=True)
class InputRecord:
    """One input subject as recorded in the manifest."""

    subject: str
    paths: dict[str, str]
    checksums: dict[str, str]
    split: str
    shard: str
    rows: int
    shape: list[int]
    spacing: list[float]
    hu: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    # Size of the shard file when it was written; None in manifests written before sizes were
    # recorded (for those, readers check only that the file exists).
    shard_bytes: int | None = None


@dataclass(kw_only=True)
class Manifest:
    """The manifest of a shard directory (``manifest.json``)."""

    family: str
    build: dict[str, Any]
    patch_size: list[int]
    spacing: list[float]
    window: dict[str, float]
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: list[InputRecord] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    # Counts the builds of this folder; shards written by a build carry its number in their name.
    generation: int = 0
    format: str = FORMAT
    created: float = field(default_factory=time.time)

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(r.rows for r in self.inputs if r.split == s) for s in SPLITS}

    @property
    def fingerprint(self) -> str:
        """Hash of the build settings and every input checksum: equal data, equal fingerprint."""
        payload = json.dumps(
            {
                "build": self.build,
                "inputs": sorted((r.subject, sorted(r.checksums.values())) for r in self.inputs),
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def shard_files(self, root: str | Path, split: str) -> list[str]:
        """Paths of a split's shard files (empty shards are never listed), each checked.

        Raises:
            ValueError: a listed file is missing or its size is not the recorded one (the
                folder was changed after its build; other files in it are never read).
        """
        files = []
        for rec in self.inputs:
            if rec.split != split or not rec.rows:
                continue
            path = Path(root) / rec.shard
            problem = shard_problem(path, rec.shard_bytes)
            if problem:
                raise ValueError(
                    f"{path}: {problem}, but {Path(root) / MANIFEST} lists it; the folder was "
                    f"changed after its build: rebuild it with `ctray data build --family "
                    f"{self.family} ... --out {root}`"
                )
            files.append(str(path))
        return files

    def to_json(self) -> str:
        data = {
            "format": self.format,
            "family": self.family,
            "fingerprint": self.fingerprint,
            "created": self.created,
            "build": self.build,
            "patch_size": self.patch_size,
            "spacing": self.spacing,
            "window": self.window,
            "columns": self.columns,
            "counts": self.counts,
            "generation": self.generation,
            "inputs": [vars(r) for r in self.inputs],
            "skipped": self.skipped,
        }
        return json.dumps(data, indent=2)

    def save(self, root: str | Path) -> Path:
        return atomic_write_bytes(Path(root) / MANIFEST, self.to_json().encode())


def load_manifest(root: str | Path) -> Manifest:
    """Read ``DIR/manifest.json``; a missing one says how to build it."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no shard manifest; build one with `ctray data build --family NAME "
            f"--input DIR --out {root}` (or `--phantom N` for demo data)"
        )
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported shard format {data.get('format')!r}")
    return Manifest(
        family=data["family"],
        build=data["build"],
        patch_size=data["patch_size"],
        spacing=data["spacing"],
        window=data["window"],
        columns=data["columns"],
        inputs=[InputRecord(**r) for r in data["inputs"]],
        skipped=data["skipped"],
        generation=data.get("generation", 0),
        created=data["created"],
    )


def shard_problem(path: Path, size: int | None) -> str | None:
    """Why ``path`` is not the shard a manifest recorded (None when it is, as far as known)."""
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return "shard file is missing"
    if size is not None and actual != size:
        return f"shard file has {actual} bytes, the manifest recorded {size}"
    return None


def describe_columns(table: pa.Table) -> dict[str, dict[str, Any]]:
    """Column name -> dtype and shape, for the manifest."""
    out: dict[str, dict[str, Any]] = {}
    for name, typ in zip(table.column_names, table.schema.types, strict=True):
        if isinstance(typ, pa.FixedShapeTensorType):
            out[name] = {"dtype": str(typ.value_type), "shape": list(typ.shape)}
        else:
            out[name] = {"dtype": str(typ), "shape": []}
    return out


def read_split(root: str | Path, split: str, columns: Iterable[str] | None = None) -> pa.Table:
    """Read a whole split with pyarrow (tests, benchmarks, small evaluations)."""
    files = load_manifest(root).shard_files(root, split)
    if not files:
        raise ValueError(f"{root}: split {split!r} has no rows")
    return pq.read_table(files, columns=list(columns) if columns else None)
