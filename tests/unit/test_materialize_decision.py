"""ctray.tune materializes shards only while they fit in a share of the object store."""

from __future__ import annotations

import numpy as np
import pytest

from ctray.data.shards import InputRecord, Manifest, describe_columns, rows_to_table
from ctray.train.trainer import MATERIALIZE_SHARE, choose_data_path, column_bytes

GIB = 2**30


def _rows(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "source": rng.random((4, 4, 2), dtype=np.float32),
            "labels": rng.integers(0, 3, (4, 4, 2), dtype=np.uint8),
            "phase": np.int8(k % 4),
            "subject": f"s{k}",
        }
        for k in range(n)
    ]


def _manifest(table, rows: dict[str, int]) -> Manifest:
    inputs = [
        InputRecord(
            subject=f"{split}-subject",
            paths={},
            checksums={},
            split=split,
            shard=f"{split}/{split}-subject.parquet",
            rows=count,
            shape=[4, 4, 2],
            spacing=[1.0, 1.0, 1.0],
            hu={},
        )
        for split, count in rows.items()
    ]
    return Manifest(
        family="phase_gan",
        build={},
        patch_size=[4, 4, 2],
        spacing=[1.0, 1.0, 1.0],
        window={"lo": -1000.0, "hi": 1000.0},
        columns=describe_columns(table),
        inputs=inputs,
    )


def test_small_shards_are_materialized_large_ones_streamed():
    fits = choose_data_path(int(0.5 * GIB), 2 * GIB, share=0.5)
    assert fits.materialize
    assert "materialized once" in fits.describe()
    too_big = choose_data_path(int(1.5 * GIB), 2 * GIB, share=0.5)
    assert not too_big.materialize
    assert "streamed from Parquet" in too_big.describe()
    # Exactly at the share still fits; one byte more streams.
    assert choose_data_path(GIB, 2 * GIB, share=0.5).materialize
    assert not choose_data_path(GIB + 1, 2 * GIB, share=0.5).materialize


def test_share_is_configurable_and_checked():
    assert not choose_data_path(1, 2 * GIB, share=0.0).materialize  # 0: always stream
    assert choose_data_path(2 * GIB, 2 * GIB, share=1.0).materialize
    assert choose_data_path(GIB, 2 * GIB).share == MATERIALIZE_SHARE
    with pytest.raises(ValueError, match="share must be in"):
        choose_data_path(1, GIB, share=1.5)
    with pytest.raises(ValueError, match="object store memory"):
        choose_data_path(1, 0.0)


def test_column_bytes_is_the_decoded_size_of_the_columns_read():
    table = rows_to_table(_rows(10))
    manifest = _manifest(table, {"train": 6, "val": 4})
    read = ["source", "labels", "phase"]
    # Fixed-width columns: exactly what Arrow holds in memory once they are read.
    assert column_bytes(manifest, read) == table.select(read).nbytes
    # Unread columns do not count; a variable-width column counts a nominal size per value.
    assert column_bytes(manifest, ["labels"]) == 10 * 4 * 4 * 2
    assert column_bytes(manifest, ["subject"]) > 0
    with pytest.raises(ValueError, match="no column 'truth'"):
        column_bytes(manifest, ["truth"])
