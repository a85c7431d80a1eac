"""TorchTrainer factory: the same call trains any family on CPU (gloo) or GPUs (NCCL)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data
from ray.data import FileShuffleConfig
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ctray.config import to_dict
from ctray.data.shards import Manifest, load_manifest
from ctray.registry import DataInfo, FamilySpec
from ctray.session import configure_data
from ctray.train.loop import LoopConfig, train_loop_per_worker

# Parallel read blocks per split: enough for the read to overlap training on a few cores.
READ_BLOCKS = 8
# Shards are materialized (read once into the object store) only while their columns take at
# most this share of it: the rest is for the blocks, checkpoints and results of running trials.
MATERIALIZE_SHARE = 0.5
# Bytes counted per value of a variable-width column (strings, lists) in that estimate.
VARIABLE_WIDTH_BYTES = 64


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Workers and devices of one training run (one Tune trial).

    Attributes:
        workers: Ray Train workers (DDP ranks); one per GPU on a GPU cluster.
        gpus_per_worker: 0 trains on CPU with gloo; > 0 uses CUDA with NCCL.
        cpus_per_worker: CPU slots each worker reserves (logical; may be fractional).
    """

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"

    def scaling_config(self) -> ScalingConfig:
        per_worker: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            per_worker["GPU"] = self.gpus_per_worker
        return ScalingConfig(
            num_workers=self.workers, use_gpu=self.use_gpu, resources_per_worker=per_worker
        )


def data_info(manifest: Manifest) -> dict[str, Any]:
    """The data geometry a model is trained in, as stored in checkpoints and model.json."""
    return DataInfo.from_manifest(manifest).as_dict()


def read_shards(
    files: list[str], columns: Sequence[str], *, shuffle_seed: int | None = None
) -> ray.data.Dataset:
    """A Ray Dataset over shard files, reading only ``columns`` (the path every trainer uses).

    The columns go to the reader itself: creating the dataset samples the files' first row
    groups to estimate their in-memory size, and with a later ``select_columns`` that sample
    decodes every column (benchmarks/bench_data.py compares both). ``shuffle_seed`` reads the
    files in a seeded random order, the same every epoch, so a resumed run reads what the
    interrupted one did; unlike ``randomize_block_order`` it needs no barrier that holds a
    whole epoch in the object store before the first batch.
    """
    configure_data()
    shuffle = (
        None
        if shuffle_seed is None
        else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=False)
    )
    return ray.data.read_parquet(
        files,
        columns=list(columns),
        override_num_blocks=max(len(files), READ_BLOCKS),
        shuffle=shuffle,
    )


def datasets(
    spec: FamilySpec,
    data_dir: str | Path,
    manifest: Manifest,
    *,
    materialize: bool = False,
    seed: int = 0,
) -> dict[str, ray.data.Dataset]:
    """Ray Data streams of the train and val shards, reading only the family's columns.

    ``materialize`` reads the shards once into the object store, so later epochs skip the
    Parquet read tasks (worth it whenever the shards fit in memory: ``choose_data_path``).
    The train split's order is seeded, so a resumed run reads what the interrupted one did:
    materialized blocks are shuffled in place, streamed files are read in a shuffled order.
    """
    if manifest.family != spec.shards_family:
        raise ValueError(
            f"{data_dir} holds {manifest.family!r} shards, {spec.name} reads "
            f"{spec.shards_family!r} shards; build them with "
            f"`ctray data build --family {spec.name}`"
        )
    out = {}
    for split in ("train", "val"):
        files = manifest.shard_files(data_dir, split)
        if not files:
            raise ValueError(f"{data_dir}: the {split!r} split has no rows")
        train = split == "train"
        if materialize:
            ds = read_shards(files, spec.columns).materialize()
            out[split] = ds.randomize_block_order(seed=seed) if train else ds
        else:
            out[split] = read_shards(files, spec.columns, shuffle_seed=seed if train else None)
    return out


@dataclass(frozen=True, kw_only=True)
class DataPath:
    """How a search reads its shards, and why (``choose_data_path``).

    Attributes:
        materialize: read once into the object store (True) or stream from Parquet every
            epoch (False).
        data_bytes: the decoded size of the columns read, both splits.
        store_bytes: the Ray cluster's object store memory.
        share: the largest share of the object store materialized shards may take.
    """

    materialize: bool
    data_bytes: int
    store_bytes: float
    share: float

    def describe(self) -> str:
        how = "materialized once" if self.materialize else "streamed from Parquet every epoch"
        relation = "<=" if self.materialize else ">"
        return (
            f"shards {how}: {self.data_bytes / 2**20:,.1f} MiB {relation} {self.share:.0%} of "
            f"the object store ({self.store_bytes / 2**30:,.2f} GiB)"
        )


def choose_data_path(
    data_bytes: int, store_bytes: float, share: float = MATERIALIZE_SHARE
) -> DataPath:
    """Materialize shards that fit in ``share`` of the object store; stream larger ones.

    Materialized blocks stay pinned in the object store for the whole search, so shards that
    outgrow it would spill to disk (or fail); streaming keeps only the blocks in flight.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"materialize share must be in [0, 1], got {share}")
    if store_bytes <= 0:
        raise ValueError(f"object store memory must be > 0 bytes, got {store_bytes}")
    return DataPath(
        materialize=data_bytes <= share * store_bytes,
        data_bytes=data_bytes,
        store_bytes=store_bytes,
        share=share,
    )


def column_bytes(manifest: Manifest, columns: Sequence[str]) -> int:
    """Decoded bytes of ``columns`` over both splits, from the manifest (no file is read)."""
    rows = sum(manifest.counts.values())
    total = 0
    for name in columns:
        if name not in manifest.columns:
            raise ValueError(
                f"the shards have no column {name!r} (they have {', '.join(manifest.columns)})"
            )
        info = manifest.columns[name]
        try:
            width = max(pa.type_for_alias(info["dtype"]).bit_width // 8, 1)
        except ValueError:  # strings, lists: no fixed width
            width = VARIABLE_WIDTH_BYTES
        total += rows * math.prod(info["shape"]) * width
    return total


def object_store_bytes() -> float:
    """The object store memory of the Ray cluster this process is connected to."""
    return float(ray.cluster_resources().get("object_store_memory", 0.0))


def make_trainer(
    *,
    spec: FamilySpec,
    loop: LoopConfig,
    family_config: Any,
    data_dir: str | Path,
    resources: Resources = Resources(),
    storage_path: str | None = None,
    name: str | None = None,
    max_failures: int = 0,
    callbacks: list[Any] | None = None,
    keep_checkpoints: int = 2,
    prepared: dict[str, ray.data.Dataset] | None = None,
) -> TorchTrainer:
    """A TorchTrainer that runs :func:`train_loop_per_worker` for ``spec`` on ``data_dir``.

    ``prepared`` passes datasets built once by the caller (Tune shares them across trials).
    ``keep_checkpoints`` is at least 2: a damaged latest checkpoint falls back to the one
    before it (ctray.train.state.load_resumable).
    """
    if keep_checkpoints < 2:
        raise ValueError(f"keep_checkpoints must be >= 2 (a fallback), got {keep_checkpoints}")
    manifest = load_manifest(data_dir)
    config = {
        "loop": to_dict(loop),
        "family_config": to_dict(family_config),
        "data": data_info(manifest),
        "data_dir": str(Path(data_dir).resolve()),
        "fingerprint": manifest.fingerprint,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend=resources.backend),
        scaling_config=resources.scaling_config(),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=callbacks,
        ),
        datasets=prepared or datasets(spec, data_dir, manifest, seed=loop.seed),
    )
