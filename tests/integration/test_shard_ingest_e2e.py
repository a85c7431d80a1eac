"""How the trainer reads shards with Ray Data: streamed splits stream, materialized ones shuffle
their blocks in place, and only the family's columns are read."""

from __future__ import annotations

from ctray.data.shards import load_manifest
from ctray.registry import get_family
from ctray.train.trainer import datasets

SPEC = get_family("phase_gan")


def _plan(dataset, capsys) -> str:
    dataset.explain()
    return capsys.readouterr().out


def _rows(dataset) -> list[tuple[int, float]]:
    """Every row as (target phase, sum of its source patch): a fingerprint of the rows read."""
    out = []
    for batch in dataset.iter_batches(batch_size=4, batch_format="numpy"):
        out += [
            (int(p), round(float(s.sum()), 3))
            for p, s in zip(batch["target_phase"], batch["source"], strict=True)
        ]
    return sorted(out)


def test_streamed_train_split_has_no_epoch_barrier(ray_session, phantom_shards, capsys):
    manifest = load_manifest(phantom_shards)
    streamed = datasets(SPEC, phantom_shards, manifest, materialize=False, seed=1)
    # randomize_block_order on a stream is an all-to-all step: it would hold a whole epoch in
    # the object store before the first batch (and spill shards that outgrow it).
    assert "RandomizeBlockOrder" not in _plan(streamed["train"], capsys)
    assert streamed["train"].columns() == list(SPEC.columns)
    rows = _rows(streamed["train"])
    assert len(rows) == manifest.counts["train"]
    assert len(_rows(streamed["val"])) == manifest.counts["val"]

    materialized = datasets(SPEC, phantom_shards, manifest, materialize=True, seed=1)
    assert "RandomizeBlockOrder" in _plan(materialized["train"], capsys)
    assert _rows(materialized["train"]) == rows  # the same rows either way
