"""A worker's rows of a split, kept in memory after one pass so later epochs skip Ray Data.

Why: on data that fits in a worker (demos, searches on patches, the benchmarks), streaming
the split through Ray Data every epoch (split coordinator, read tasks, the iterator's
threads) costs more CPU per sample than the training step itself on small models
(``benchmarks/bench_train.py``: 84 against 58 ms per sample on 2 cores). The first epoch
streams as before and keeps what it yields; when the whole pass fits ``budget_bytes`` on
every worker, later epochs draw their batches from those tensors:

* train: a fresh seeded permutation of the worker's rows every epoch (a full shuffle, where
  the stream shuffles within a buffer); rows stay on the worker that first read them;
* val: the same rows in the same order every epoch. A pass cut short by ``max_val_batches``
  is kept too, so every epoch is judged on the same batches.

Larger splits, a train pass cut short by ``max_train_batches``, or a budget of 0 stream every
epoch. Every worker must take the same path (a streaming split waits for all its consumers),
so the choice is agreed across the process group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

Batch = dict[str, torch.Tensor]


def all_agree(flag: bool, device: torch.device) -> bool:
    """``flag`` on every worker of the process group (``flag`` itself without one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


class SplitCache:
    """One split's rows on one worker: collected during the first pass, replayed after.

    Args:
        budget_bytes: the most the kept rows may take (0: never keep them).
        shuffle: reorder the kept rows every epoch (train) or keep their order (val).
        keep_partial: keep a pass cut short by a batch limit (val: the same subset each epoch).
    """

    def __init__(self, *, budget_bytes: int, shuffle: bool, keep_partial: bool):
        self.budget_bytes = budget_bytes
        self.shuffle = shuffle
        self.keep_partial = keep_partial
        self.rows: Batch | None = None
        self.decided = budget_bytes <= 0
        self.reason = "off (budget 0)" if self.decided else "undecided"

    def batches(
        self,
        stream: Callable[[torch.device], Iterable[Batch]],
        *,
        batch_size: int,
        limit: int | None,
        seed: int,
        device: torch.device,
    ) -> Iterator[Batch]:
        """This epoch's batches on ``device``: replayed from memory, or from ``stream(device)``
        (which yields batches already on the device it is given)."""
        if self.rows is not None:
            yield from self._replay(batch_size, limit, seed, device)
            return
        if self.decided:
            yield from _limited(stream(device), limit)
            return
        kept: list[Batch] | None = []
        nbytes, cut_short = 0, False
        for i, batch in enumerate(stream(torch.device("cpu"))):
            if limit is not None and i >= limit:
                cut_short = True
                break
            if kept is not None:
                nbytes += sum(v.numel() * v.element_size() for v in batch.values())
                if nbytes <= self.budget_bytes:
                    kept.append(batch)
                else:
                    kept = None  # over budget: let the rows go
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        fits = bool(kept) and (self.keep_partial or not cut_short)
        self.decided = True
        if not all_agree(fits, device):
            self.reason = _why_not(kept, self.budget_bytes, cut_short)
            return
        assert kept  # agreed: every worker, this one included, kept its rows
        self.rows = {k: torch.cat([b[k] for b in kept]) for k in kept[0]}
        self.reason = f"{len(self)} rows, {nbytes / 2**20:.1f} MiB kept in worker memory"

    def __len__(self) -> int:
        return 0 if self.rows is None else len(next(iter(self.rows.values())))

    def _replay(self, batch_size: int, limit: int | None, seed: int, device: torch.device):
        assert self.rows is not None
        n = len(self)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        rows = self.rows
        batches = (
            {k: v[order[i : i + batch_size]].to(device, non_blocking=True) for k, v in rows.items()}
            for i in range(0, n, batch_size)
        )
        yield from _limited(batches, limit)


def _limited(batches: Iterable[Batch], limit: int | None) -> Iterator[Batch]:
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            return
        yield batch


def _why_not(kept: list[Batch] | None, budget: int, cut_short: bool) -> str:
    if kept is None:
        return f"streams every epoch (over {budget / 2**20:.0f} MiB in memory)"
    if not kept:
        return "streams every epoch (no rows on this worker)"
    if cut_short:
        return "streams every epoch (the pass was cut short by its batch limit)"
    return "streams every epoch (another worker's rows did not fit)"
