"""TorchTrainer factory: the same call trains any family on CPU (gloo) or GPUs (NCCL)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.data
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ctray.config import to_dict
from ctray.data.shards import Manifest, load_manifest
from ctray.registry import DataInfo, FamilySpec
from ctray.session import configure_data
from ctray.train.loop import LoopConfig, train_loop_per_worker

# Parallel read blocks per split: enough for the read to overlap training on a few cores.
READ_BLOCKS = 8


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


def read_shards(files: list[str], columns: Sequence[str]) -> ray.data.Dataset:
    """A Ray Dataset over shard files, reading only ``columns`` (the path every trainer uses)."""
    configure_data()
    ds = ray.data.read_parquet(files, override_num_blocks=max(len(files), READ_BLOCKS))
    return ds.select_columns(list(columns))


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
    Parquet read tasks (worth it whenever the shards fit in memory).
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
        ds = read_shards(files, spec.columns)
        if materialize:
            ds = ds.materialize()
        # Seeded, so a resumed run reads blocks in the order the interrupted one did.
        out[split] = ds.randomize_block_order(seed=seed) if split == "train" else ds
    return out


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
    """
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
