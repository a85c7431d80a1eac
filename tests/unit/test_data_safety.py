"""Data safety of `ctray data build`: failed rebuilds, disk full, unsafe subject names, reports.

The sources are tiny synthetic subjects fed to the real builder (real Parquet files, real
manifests); disk full is simulated at the file-writing boundary (the Parquet writer and the
file object behind the manifest write).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctray.cli import main
from ctray.data.build import REPORT, BuildConfig, BuildError, SubjectSource, build_shards
from ctray.data.nifti import save_nifti
from ctray.data.shards import MANIFEST, column_numpy, load_manifest, read_split
from ctray.families.pix2pix.data import build as build_pix2pix

CFG = BuildConfig(patch_size=(4, 4, 4), patches_per_subject=2, val_fraction=0.34)
# A different window: every shard is rebuilt, with different values.
REBUILD = BuildConfig(patch_size=(4, 4, 4), patches_per_subject=2, val_fraction=0.34,
                      window_lo=-500.0, window_hi=500.0)  # fmt: skip
NAMES = ("a", "b", "c")


def _source(name: str, value: float, *, error: str = "") -> SubjectSource:
    """A subject whose rows hold ``value`` (or whose input is unusable: ``error``)."""

    def make(rng: np.random.Generator, split: str):
        if error:
            raise ValueError(error)
        rows = [{"x": np.full((4, 4, 4), value, np.float32), "subject": name}] * 2
        stats = {"shape": [4, 4, 4], "spacing": [1.0, 1.0, 1.0], "hu": {"min": value}}
        return rows, stats

    return SubjectSource(
        subject=name,
        paths={"scan": f"/in/{name}.nii.gz"},
        checksums={"scan": f"{name}:{value}:{error}"},
        make_rows=make,
    )


def _build(out: Path, sources: list[SubjectSource], config: BuildConfig = CFG, **kw):
    return build_shards(
        family="toy", out=out, sources=sources, skipped=[], config=config, progress=False, **kw
    )


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (the build report aside)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != REPORT
    }


def _values(out: Path) -> set[float]:
    return {
        float(v)
        for split in ("train", "val")
        for v in np.unique(column_numpy(read_split(out, split, ["x"])["x"]))
    }


def _report(out: Path) -> dict:
    return json.loads((out / REPORT).read_text())


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    """A shard folder built from subjects a, b, c holding the value 1."""
    out = tmp_path / "out"
    _build(out, [_source(n, 1.0) for n in NAMES])
    return out


def _enospc(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


class _FullDiskFile:
    """A file whose write stores half the data, then finds the disk full."""

    def __init__(self, fh) -> None:
        self.fh = fh

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def write(self, data: bytes) -> int:
        self.fh.write(data[: len(data) // 2])
        raise _enospc()


def _fail(how: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make the rebuild fail part-way; returns what its error must say."""
    if how == "strict":  # subject c is unusable; a and b were already written
        return "c: scanner export is empty"
    if how == "shard_disk_full":  # the second shard is half written when the disk fills up
        real, calls = pq.write_table, []

        def write_table(table: pa.Table, where: str | Path, **kwargs) -> None:
            calls.append(where)
            if len(calls) < 2:
                return real(table, where, **kwargs)
            sink = pa.BufferOutputStream()
            real(table, sink, **kwargs)
            Path(where).write_bytes(sink.getvalue().to_pybytes()[:200])
            raise _enospc(str(where))

        monkeypatch.setattr(pq, "write_table", write_table)
        return "cannot write shard .*: No space left on device"
    # every shard written, then the disk fills up while the manifest (and report) are written
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDiskFile(real_fdopen(fd, *a, **k)))
    return f"cannot write .*{MANIFEST}: No space left on device"


@pytest.mark.parametrize("how", ["strict", "shard_disk_full", "manifest_disk_full"])
def test_a_failed_rebuild_leaves_the_previous_build_as_it_was(
    good: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _snapshot(good)
    fingerprint = load_manifest(good).fingerprint
    sources = [_source("a", 2.0), _source("b", 2.0), _source("c", 2.0)]
    config = REBUILD
    if how == "strict":
        sources[2] = _source("c", 2.0, error="scanner export is empty")
        config = dataclasses.replace(REBUILD, strict=True)
    with monkeypatch.context() as patch:
        message = _fail(how, patch)
        with pytest.raises(BuildError, match=message) as info:
            _build(good, sources, config)
    # not one byte changed, no half-written or new-generation file left behind
    assert _snapshot(good) == before
    assert _values(good) == {1.0}
    assert load_manifest(good).fingerprint == fingerprint
    assert f"{good / MANIFEST} is unchanged" in str(info.value)
    report = _report(good)
    if how == "manifest_disk_full":  # the report could not be written either: the old one stays
        assert report["status"] == "ok" and info.value.report is None
    else:
        assert report["status"] == "failed" and re.match(message, report["error"])
        assert report["manifest"] == {"fingerprint": fingerprint, "generation": 1}


def test_a_rebuild_writes_a_new_generation_and_removes_the_old_one(good: Path) -> None:
    first = load_manifest(good)
    assert first.generation == 1
    assert sorted(r.shard for r in first.inputs) == sorted(
        f"{r.split}/{r.subject}.g1.parquet" for r in first.inputs
    )
    second = _build(good, [_source(n, 2.0) for n in NAMES], REBUILD)
    assert second.generation == 2
    assert all(r.shard.endswith(".g2.parquet") for r in second.inputs)
    assert sorted(_snapshot(good)) == sorted([MANIFEST, *(r.shard for r in second.inputs)])
    assert _values(good) == {2.0}
    # incremental: only the changed subject gets a file of the new generation
    inode = {r.subject: (good / r.shard).stat().st_ino for r in second.inputs}
    third = _build(good, [_source("a", 2.0), _source("b", 3.0), _source("c", 2.0)], REBUILD)
    shards = {r.subject: r.shard for r in third.inputs}
    assert shards["b"].endswith(".g3.parquet")
    assert all(shards[n] == s for n, s in ((r.subject, r.shard) for r in second.inputs) if n != "b")
    assert all((good / shards[n]).stat().st_ino == inode[n] for n in ("a", "c"))
    assert sorted(_snapshot(good)) == sorted([MANIFEST, *shards.values()])
    assert _values(good) == {2.0, 3.0}
    assert _report(good)["status"] == "ok" and _report(good)["generation"] == 3


def test_readers_use_only_the_shards_the_manifest_lists(good: Path) -> None:
    manifest = load_manifest(good)
    counts = manifest.counts
    # an unlisted file is never read (and the next build removes it)
    intruder = good / "train" / "intruder.parquet"
    pq.write_table(pa.table({"x": [9.0] * 5}), intruder)
    assert sum(read_split(good, s, ["x"]).num_rows for s in ("train", "val")) == sum(
        counts.values()
    )
    _build(good, [_source(n, 1.0) for n in NAMES])
    assert not intruder.exists()
    # a listed file that is not the one the build wrote is refused, by name and with a fix
    rec = next(r for r in load_manifest(good).inputs if r.split == "train")
    shard = good / rec.shard
    shard.write_bytes(shard.read_bytes()[:-10])
    msg = rf"{rec.shard}: shard file has {rec.shard_bytes - 10} bytes, the manifest recorded"
    with pytest.raises(ValueError, match=msg):
        read_split(good, "train")
    with pytest.raises(ValueError, match="rebuild it with `ctray data build --family toy"):
        load_manifest(good).shard_files(good, "train")  # what the Ray Data reader lists
    # ... and the next build replaces it rather than reusing it
    _build(good, [_source(n, 1.0) for n in NAMES])
    assert read_split(good, "train").num_rows == counts["train"]


def test_a_folder_built_before_generations_is_read_and_reused(good: Path) -> None:
    """Manifests without generation and shard sizes (older builds) still read and rebuild."""
    raw = json.loads((good / MANIFEST).read_text())
    del raw["generation"]
    for rec in raw["inputs"]:
        del rec["shard_bytes"]
        legacy = f"{rec['split']}/{rec['subject']}.parquet"
        (good / rec["shard"]).rename(good / legacy)
        rec["shard"] = legacy
    (good / MANIFEST).write_text(json.dumps(raw))
    assert _values(good) == {1.0}
    inode = {p: (good / p).stat().st_ino for p in _snapshot(good) if p != MANIFEST}
    again = _build(good, [_source(n, 1.0) for n in NAMES])
    assert again.generation == 1
    assert {r.shard: (good / r.shard).stat().st_ino for r in again.inputs} == inode
    assert all(r.shard_bytes == (good / r.shard).stat().st_size for r in again.inputs)


UNSAFE = {
    "../../escaped": "contains '/'",
    "/tmp/absolute": "contains '/'",
    "..": "starts with '.'",
    ".hidden": "starts with '.'",
    "": "is empty",
    "nul\x00byte": r"contains '\x00'",
    "back\\slash": r"contains '\\'",
    "C:drive": "contains ':'",
    "x" * 201: "is longer than 200 bytes",
}


def test_unsafe_subject_names_are_skipped_and_never_become_paths(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    sources = [_source(name, 1.0) for name in UNSAFE]
    sources += [_source("ok1", 1.0), _source("OK1", 1.0), _source("ok2", 1.0)]
    manifest = _build(out, sources)
    assert sorted(r.subject for r in manifest.inputs) == ["ok1", "ok2"]
    reasons = [s["reason"] for s in manifest.skipped]
    for name, why in UNSAFE.items():
        assert any(r.startswith(f"subject name {name!r} {why}") for r in reasons), name
    assert "duplicate subject 'OK1' (also from /in/ok1.nii.gz)" in reasons
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    shards = [r.shard for r in manifest.inputs]
    assert written == sorted(f"deep/out/{f}" for f in [MANIFEST, REPORT, *shards])


def test_a_pair_csv_cannot_write_outside_the_output_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("p0", "p1"):
        vol = rng.normal(40, 20, (8, 8, 2)).astype(np.float32)
        save_nifti(root / "A" / f"{name}.nii.gz", vol, np.eye(4), dtype=np.float32)
        save_nifti(root / "B" / f"{name}.nii.gz", vol + 30, np.eye(4), dtype=np.float32)
    csv = root / "pairs.csv"
    csv.write_text(
        "a,b,subject\n"
        "A/p0.nii.gz,B/p0.nii.gz,p0\n"
        "A/p1.nii.gz,B/p1.nii.gz,../../../escaped\n"
        "A/p1.nii.gz,B/p1.nii.gz,p1\n"
        "A/p0.nii.gz,B/p0.nii.gz,P0\n"
    )
    out = root / "shards"
    opts = {"resize_to": 8, "min_body_fraction": 0.0}
    manifest = build_pix2pix(out=out, inputs=csv, config=CFG, options=opts, progress=False)
    assert sorted(r.subject for r in manifest.inputs) == ["p0", "p1"]
    assert {"path": str(csv), "reason": "line 3: subject '../../../escaped' contains '/' "
            "(path separators, control characters)"} in manifest.skipped  # fmt: skip
    assert any(s["reason"].startswith("duplicate subject 'P0'") for s in manifest.skipped)
    outside = [p for p in tmp_path.rglob("*.parquet") if out not in p.parents]
    assert outside == []


def test_a_failed_build_reports_every_skip_and_keeps_the_previous_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    _build(out, [_source(n, 1.0) for n in NAMES])
    before = _snapshot(out)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "readme.txt").write_text("scans from the PACS export\n")
    (inputs / "scan.dcm").write_bytes(b"DICM")
    argv = ["data", "build", "--family", "phase_gan", "--input", str(inputs), "--phantom", "1"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "need at least 2 subjects for a train/val split, got 1" in err
    assert "--option simulations=K" in err and "--simulations K" not in err
    assert "2 input(s) skipped:" in err
    for name in ("readme.txt", "scan.dcm"):
        assert f"  {inputs / name}: not a NIfTI file (.nii or .nii.gz)" in err
    assert f"build report: {out / REPORT}" in err
    assert f"{out / MANIFEST} is unchanged" in err
    assert _snapshot(out) == before
    report = _report(out)
    assert report["status"] == "failed" and report["family"] == "phase_gan"
    assert report["error"].startswith("need at least 2 subjects")
    assert sorted(Path(s["path"]).name for s in report["skipped"]) == ["readme.txt", "scan.dcm"]
    assert report["manifest"]["fingerprint"] == load_manifest(out).fingerprint
