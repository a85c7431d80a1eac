"""The one training loop every family runs inside Ray Train workers.

It owns what no family should re-implement: device and DDP wrapping, bf16 autocast on CUDA,
resuming from the latest checkpoint, per-epoch checkpoints (models, optimisers, epoch, RNG),
validation metrics averaged across workers, `ray.train.report`, TensorBoard scalars and
montages. Families plug in through their FamilySpec steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from ctray.config import from_dict
from ctray.registry import DataInfo, FamilySpec, StepContext, get_family
from ctray.train.montage import montage

STATE_FILE = "state.pt"
CONFIG_FILE = "train_config.json"
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Settings of the generic loop (the family's own settings live in its config).

    Attributes:
        family: registered family name.
        epochs: total epochs (a resumed run continues up to this).
        batch_size: per-worker batch size.
        seed: base seed; each worker adds its rank.
        precision: ``auto`` = bf16 autocast on CUDA, fp32 on CPU.
        max_train_batches / max_val_batches: per-epoch caps (smoke tests).
        shuffle_buffer: rows in the local shuffle buffer of the train stream.
        tensorboard_dir: where rank 0 writes TensorBoard events (None: off).
    """

    family: str
    epochs: int = 4
    batch_size: int = 4
    seed: int = 0
    precision: Precision = "auto"
    max_train_batches: int | None = None
    max_val_batches: int | None = None
    shuffle_buffer: int = 64
    tensorboard_dir: str | None = None


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a device: bf16 only where it is asked for (or auto) on CUDA."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        if device.type != "cuda":
            raise ValueError("precision='bf16' needs a CUDA device; use 'auto' or 'fp32' on CPU")
        return torch.bfloat16
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper (state dicts without 'module.' prefixes)."""
    return model.module if hasattr(model, "module") else model


def save_state(
    path: Path, models: dict[str, nn.Module], optimizers: dict[str, Any], epoch: int
) -> None:
    """Everything needed to resume, in a file torch.load(weights_only=True) can read."""
    state = {
        "epoch": epoch,
        "models": {k: unwrap(m).state_dict() for k, m in models.items()},
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "torch_rng": torch.get_rng_state(),
        "python_rng": list(random.getstate()[1]),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _iterate(
    split: str, loop: LoopConfig, device: torch.device, limit: int | None
) -> Iterator[dict]:
    shard = ray.train.get_dataset_shard(split)
    buffer = loop.shuffle_buffer if split == "train" else None
    batches = shard.iter_torch_batches(
        batch_size=loop.batch_size, device=device, local_shuffle_buffer_size=buffer
    )
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            break
        yield batch


class _Mean:
    """Running sums of per-sample (or per-step) values, reduced across workers on demand."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, key: str, values: torch.Tensor | float) -> None:
        v = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
        finite = torch.isfinite(v)
        self.sums[key] += float(v[finite].sum())
        self.counts[key] += float(finite.sum())

    def result(self) -> dict[str, float]:
        keys = sorted(self.sums)
        sums = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
        counts = torch.tensor([self.counts[k] for k in keys], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        return {
            k: (s / c if c else math.nan)
            for k, s, c in zip(keys, sums.tolist(), counts.tolist(), strict=True)
        }


def _tensorboard(loop: LoopConfig, rank: int):
    if rank != 0 or not loop.tensorboard_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(loop.tensorboard_dir)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` has ``loop``, ``family_config`` and ``data`` dicts."""
    loop = from_dict(LoopConfig, config["loop"], where="loop config")
    spec: FamilySpec = get_family(loop.family)
    family_cfg = from_dict(spec.config_cls, config["family_config"], where=f"{spec.name} config")
    data = DataInfo.from_dict(config["data"])
    ctx_train = ray.train.get_context()
    rank = ctx_train.get_world_rank()
    torch.manual_seed(loop.seed + rank)
    random.seed(loop.seed + rank)
    device = ray.train.torch.get_device()
    dtype = resolve_precision(loop.precision, device)

    def autocast() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    bare = spec.build_models(family_cfg, data)
    optimizers = spec.build_optimizers(family_cfg, bare)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_state(Path(ckpt_dir) / STATE_FILE)
        for name, module in bare.items():
            module.load_state_dict(state["models"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epoch"]) + 1
    models = {k: ray.train.torch.prepare_model(m) for k, m in bare.items()}
    writer = _tensorboard(loop, rank)

    for epoch in range(start_epoch, loop.epochs):
        started = time.perf_counter()
        ctx = StepContext(
            models=models,
            optimizers=optimizers,
            config=family_cfg,
            data=data,
            epoch=epoch,
            num_epochs=loop.epochs,
            device=device,
            autocast=autocast,
        )
        for m in models.values():
            m.train()
        train_mean = _Mean()
        for batch in _iterate("train", loop, device, loop.max_train_batches):
            for key, value in spec.train_step(ctx, batch).items():
                train_mean.add(key, value)
        for m in models.values():
            m.eval()
        val_mean = _Mean()
        preview = None
        with torch.no_grad():
            for batch in _iterate("val", loop, device, loop.max_val_batches):
                for key, values in spec.eval_step(ctx, batch).items():
                    val_mean.add(key, values)
                if preview is None and writer is not None:
                    preview = spec.preview(models, batch, family_cfg)
        metrics: dict[str, Any] = {"epoch": epoch, "epoch_time_s": time.perf_counter() - started}
        metrics.update({f"train/{k}": v for k, v in train_mean.result().items()})
        metrics.update({f"val/{k}": v for k, v in val_mean.result().items()})
        if writer is not None:
            for key, value in metrics.items():
                if isinstance(value, float) and math.isfinite(value):
                    writer.add_scalar(key, value, epoch)
            if preview is not None:
                writer.add_image(
                    "preview/input_output_target", montage(*preview), epoch, dataformats="HW"
                )
            writer.flush()
        if rank == 0:
            shown = {
                k: round(v, 4)
                for k, v in metrics.items()
                if k.startswith("val/") and "roi" not in k
            }
            print(
                f"[{spec.name}] epoch {epoch + 1}/{loop.epochs} "
                f"{metrics['epoch_time_s']:.1f}s {shown}",
                flush=True,
            )
        _report(metrics, models, optimizers, epoch, config, rank)
    if writer is not None:
        writer.close()


def _report(
    metrics: dict[str, Any], models, optimizers, epoch: int, config: dict[str, Any], rank: int
) -> None:
    """Report metrics; rank 0 attaches a checkpoint written completely before it is handed over."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ctray-ckpt-") as tmp:
        save_state(Path(tmp) / STATE_FILE, models, optimizers, epoch)
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
