"""Parquet shards with fixed-shape tensor columns, atomic writes and the shard manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctray.data.shards import (
    FORMAT,
    MANIFEST,
    InputRecord,
    Manifest,
    atomic_write_bytes,
    column_numpy,
    describe_columns,
    load_manifest,
    read_split,
    rows_to_table,
    sha256_file,
    tensor_array,
    write_table_atomic,
)


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image = rng.standard_normal((4, 3, 5)).astype(np.float32)
        image[0, 0, 0] = np.float32(-0.0)
        image[0, 0, 1] = np.float32(np.nan)
        image[0, 0, 2] = np.float32(np.inf)
        image[0, 0, 3] = np.float32(1e-45)  # subnormal
        rows.append(
            {
                "image": image,
                "labels": rng.integers(0, 256, (4, 3, 5), dtype=np.uint8),
                "phase": np.int8(i % 4),
                "weight": float(i) / 3.0,
                "subject": f"subject-{i}é",
            }
        )
    return rows


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_shard_round_trip_is_bit_exact(tmp_path: Path) -> None:
    rows = _rows(5)
    path = write_table_atomic(rows_to_table(rows), tmp_path / "train" / "s.parquet")
    assert path == tmp_path / "train" / "s.parquet"
    assert _listing(tmp_path) == ["train", "train/s.parquet"]  # no temporary file left

    table = pq.read_table(path)
    assert table.num_rows == 5
    assert isinstance(table.schema.field("image").type, pa.FixedShapeTensorType)
    assert isinstance(table.schema.field("labels").type, pa.FixedShapeTensorType)

    image = column_numpy(table["image"])
    labels = column_numpy(table["labels"])
    assert image.dtype == np.float32 and image.shape == (5, 4, 3, 5)
    assert labels.dtype == np.uint8 and labels.shape == (5, 4, 3, 5)
    want_image = np.stack([r["image"] for r in rows])
    assert np.array_equal(image.view(np.uint32), want_image.view(np.uint32))  # NaN, -0 too
    assert np.array_equal(labels, np.stack([r["labels"] for r in rows]))

    phase = column_numpy(table["phase"])
    assert phase.dtype == np.int8 and phase.tolist() == [0, 1, 2, 3, 0]
    weight = column_numpy(table["weight"])
    assert weight.dtype == np.float64 and weight.tolist() == [r["weight"] for r in rows]
    assert column_numpy(table["subject"]).tolist() == [r["subject"] for r in rows]


def test_round_trip_across_row_groups_and_chunks(tmp_path: Path) -> None:
    data = np.arange(10 * 2 * 3, dtype=np.float32).reshape(10, 2, 3)
    table = pa.table({"x": tensor_array(data)})
    write_table_atomic(table, tmp_path / "a.parquet", row_group_size=3)
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.num_row_groups == 4
    back = pq.read_table(tmp_path / "a.parquet")
    assert np.array_equal(column_numpy(back["x"]), data)
    chunked = pa.chunked_array([tensor_array(data[:4]), tensor_array(data[4:])])
    assert np.array_equal(column_numpy(chunked), data)


def test_tensor_array_keeps_non_contiguous_input() -> None:
    base = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    view = base.transpose(0, 2, 1)  # not C-contiguous
    assert np.array_equal(column_numpy(tensor_array(view)), view)


def test_describe_columns() -> None:
    desc = describe_columns(rows_to_table(_rows(2)))
    assert desc == {
        "image": {"dtype": "float", "shape": [4, 3, 5]},
        "labels": {"dtype": "uint8", "shape": [4, 3, 5]},
        "phase": {"dtype": "int8", "shape": []},
        "weight": {"dtype": "double", "shape": []},
        "subject": {"dtype": "string", "shape": []},
    }


def test_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "s.parquet").mkdir()  # renaming a file onto a directory fails
    with pytest.raises(OSError):
        write_table_atomic(rows_to_table(_rows(1)), tmp_path / "s.parquet")
    assert _listing(tmp_path) == ["s.parquet"]
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "s.parquet", b"x")
    assert _listing(tmp_path) == ["s.parquet"]


def test_atomic_write_replaces_existing(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "m.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert _listing(tmp_path) == ["deep", "deep/m.json"]


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(path, chunk=1) == sha256_file(path)


# --------------------------------------------------------------------------- manifest


def _record(subject: str, split: str, rows: int, checksum: str = "c0") -> InputRecord:
    return InputRecord(
        subject=subject,
        paths={"scan": f"/in/{subject}.nii.gz"},
        checksums={"scan": checksum, "labels": checksum + "L"},
        split=split,
        shard=f"{split}/{subject}.parquet",
        rows=rows,
        shape=[10, 11, 12],
        spacing=[1.5, 1.5, 3.0],
        hu={"min": -1000.0, "max": 800.0, "mean": -100.0, "std": 300.0},
        extra={"phases": ["arterial", "native"]},
    )


def _manifest(*records: InputRecord, build: dict | None = None) -> Manifest:
    return Manifest(
        family="phase_gan",
        build=build if build is not None else {"patch_size": [16, 16, 16], "seed": 0},
        patch_size=[16, 16, 16],
        spacing=[3.0, 3.0, 3.0],
        window={"lo": -1000.0, "hi": 1000.0},
        columns={"x": {"dtype": "float", "shape": [16, 16, 16]}},
        inputs=list(records),
        skipped=[{"path": "/in/bad.nii.gz", "reason": "truncated"}],
    )


def test_manifest_save_load_round_trip(tmp_path: Path) -> None:
    m = _manifest(_record("a", "train", 6), _record("b", "val", 3), _record("c", "train", 0))
    m.save(tmp_path)
    assert _listing(tmp_path) == [MANIFEST]
    raw = json.loads((tmp_path / MANIFEST).read_text())
    assert raw["format"] == FORMAT
    assert raw["counts"] == {"train": 6, "val": 3}
    assert raw["fingerprint"] == m.fingerprint

    back = load_manifest(tmp_path)
    assert back.to_json() == m.to_json()
    assert back.created == m.created
    assert back.inputs == m.inputs
    assert back.skipped == m.skipped
    assert back.fingerprint == m.fingerprint
    assert back.counts == {"train": 6, "val": 3}
    # listed shards must exist; empty shards are never listed
    with pytest.raises(ValueError, match=r"a\.parquet: shard file is missing"):
        back.shard_files(tmp_path, "train")
    rows = _rows(9)
    write_table_atomic(rows_to_table(rows[:6]), tmp_path / "train" / "a.parquet")
    write_table_atomic(rows_to_table(rows[6:]), tmp_path / "val" / "b.parquet")
    assert back.shard_files(tmp_path, "train") == [str(tmp_path / "train" / "a.parquet")]
    assert back.shard_files(tmp_path, "val") == [str(tmp_path / "val" / "b.parquet")]


def test_fingerprint_stable_for_equal_content() -> None:
    a = _manifest(_record("a", "train", 6), _record("b", "val", 3))
    b = _manifest(_record("b", "val", 3), _record("a", "train", 6))  # other order, other time
    b.created = a.created + 100
    b.skipped = []
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 16 and int(a.fingerprint, 16) >= 0


def test_fingerprint_changes_with_an_input_checksum_or_the_build() -> None:
    base = _manifest(_record("a", "train", 6), _record("b", "val", 3))
    changed = _manifest(_record("a", "train", 6), _record("b", "val", 3, checksum="c1"))
    assert changed.fingerprint != base.fingerprint
    renamed = _manifest(_record("a", "train", 6), _record("z", "val", 3))
    assert renamed.fingerprint != base.fingerprint
    rebuilt = _manifest(
        _record("a", "train", 6), _record("b", "val", 3), build={"patch_size": [8, 8, 8], "seed": 0}
    )
    assert rebuilt.fingerprint != base.fingerprint


def test_load_manifest_missing_dir_says_how_to_build(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_manifest(missing)
    msg = str(info.value)
    assert "ctray data build" in msg
    assert str(missing / MANIFEST) in msg
    assert f"--out {missing}" in msg


def test_load_manifest_rejects_other_format(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "ctray-shards/0"}))
    with pytest.raises(ValueError, match="unsupported shard format 'ctray-shards/0'"):
        load_manifest(tmp_path)


def test_read_split(tmp_path: Path) -> None:
    rows = _rows(5)
    write_table_atomic(rows_to_table(rows[:3]), tmp_path / "train" / "a.parquet")
    write_table_atomic(rows_to_table(rows[3:]), tmp_path / "train" / "b.parquet")
    _manifest(_record("a", "train", 3), _record("b", "train", 2)).save(tmp_path)
    table = read_split(tmp_path, "train", columns=["image", "phase"])
    assert table.column_names == ["image", "phase"]
    assert np.array_equal(
        column_numpy(table["image"]).view(np.uint32),
        np.stack([r["image"] for r in rows]).view(np.uint32),
    )
    with pytest.raises(ValueError, match="split 'val' has no rows"):
        read_split(tmp_path, "val")
