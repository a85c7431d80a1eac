"""A worker's split kept in memory after the first epoch (ctray.train.split_cache), no Ray."""

from __future__ import annotations

import torch

from ctray.train.split_cache import SplitCache

CPU = torch.device("cpu")


class Stream:
    """Ten rows in batches of 4, counting how often the shard was read."""

    def __init__(self, rows: int = 10, batch: int = 4) -> None:
        self.x = torch.arange(rows, dtype=torch.float32).reshape(rows, 1)
        self.batch = batch
        self.reads = 0

    def __call__(self, device: torch.device):
        self.reads += 1
        for i in range(0, len(self.x), self.batch):
            yield {"x": self.x[i : i + self.batch].to(device), "y": -self.x[i : i + self.batch]}


def epoch(cache: SplitCache, stream: Stream, *, seed: int = 0, limit: int | None = None):
    batches = list(cache.batches(stream, batch_size=4, limit=limit, seed=seed, device=CPU))
    return torch.cat([b["x"] for b in batches]).flatten().tolist(), [len(b["x"]) for b in batches]


def test_train_rows_are_read_once_then_reshuffled_every_epoch() -> None:
    stream = Stream()
    cache = SplitCache(budget_bytes=2**20, shuffle=True, keep_partial=False)
    first, _ = epoch(cache, stream, seed=1)
    assert first == list(range(10))
    assert len(cache) == 10 and "10 rows" in cache.reason
    orders = [epoch(cache, stream, seed=s) for s in (2, 3, 2)]
    assert stream.reads == 1  # later epochs never touch the shard
    for rows, sizes in orders:
        assert sorted(rows) == list(range(10)) and sizes == [4, 4, 2]
    assert orders[0] == orders[2] and orders[0] != orders[1]  # seeded per epoch
    assert orders[0][0] != list(range(10))
    # the columns stay paired row by row
    batch = next(cache.batches(stream, batch_size=4, limit=None, seed=5, device=CPU))
    assert torch.equal(batch["y"], -batch["x"])


def test_val_rows_keep_their_order_and_a_limited_pass_is_the_same_subset_each_epoch() -> None:
    stream = Stream()
    cache = SplitCache(budget_bytes=2**20, shuffle=False, keep_partial=True)
    first, _ = epoch(cache, stream, limit=2)
    assert first == list(range(8))
    assert epoch(cache, stream, limit=2)[0] == first
    assert epoch(cache, stream, seed=9, limit=2)[0] == first
    assert stream.reads == 1


def test_a_train_pass_cut_short_streams_every_epoch() -> None:
    stream = Stream()
    cache = SplitCache(budget_bytes=2**20, shuffle=True, keep_partial=False)
    for _ in range(3):
        assert len(epoch(cache, stream, limit=2)[0]) == 8
    assert stream.reads == 3 and cache.rows is None
    assert "cut short" in cache.reason


def test_rows_over_the_budget_stream_every_epoch_and_are_not_held() -> None:
    stream = Stream()
    cache = SplitCache(budget_bytes=10 * 4, shuffle=True, keep_partial=False)
    for _ in range(3):
        assert epoch(cache, stream)[0] == list(range(10))  # the stream's own order
    assert stream.reads == 3 and cache.rows is None
    assert "over" in cache.reason


def test_a_budget_of_zero_never_keeps_rows() -> None:
    stream = Stream()
    cache = SplitCache(budget_bytes=0, shuffle=True, keep_partial=False)
    for _ in range(2):
        epoch(cache, stream)
    assert stream.reads == 2 and cache.rows is None


def test_the_budget_is_the_setting_within_an_eighth_of_the_available_memory() -> None:
    import pytest

    from ctray.train.loop import LoopConfig, available_memory, cache_budget

    assert cache_budget(0) == 0
    assert cache_budget(1) == 2**20
    assert 0 < cache_budget(1e12) <= available_memory() // 8
    with pytest.raises(ValueError, match="cache_mb"):
        LoopConfig(family="toy", cache_mb=-1)
