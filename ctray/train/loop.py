"""The one training loop every family runs inside Ray Train workers.

It owns what no family should re-implement: one stage of a family at a time (earlier stages'
modules loaded from their export and frozen), device and DDP wrapping of the trained modules
only, bf16 autocast on CUDA, gradient accumulation and clipping, EMA copies, the global step,
validation every N epochs with metrics averaged across workers, `ray.train.report` with a
checkpoint (models, optimisers, EMA, epoch, step, every rank's RNG), exact resume (from the
previous checkpoint when the latest is damaged: ctray.train.state), TensorBoard scalars and
montages. Families plug in through the steps of their Stage.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from ctray.config import from_dict
from ctray.registry import DataInfo, FamilySpec, Stage, StepContext, get_family
from ctray.train.montage import display_window, montage
from ctray.train.optimization import Optimization
from ctray.train.split_cache import SplitCache
from ctray.train.state import (
    all_rng_states,
    ema_weights,
    load_resumable,
    make_ema,
    restore_rank_rng,
    seed_everything,
    write_checkpoint,
)

Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Settings of the generic loop (the family's own settings live in its config).

    Attributes:
        family: registered family name.
        stage: which of the family's stages to train (None: a single-stage family's only one).
        init_from: an exported model directory holding the frozen earlier stages' modules
            (needed by every stage but the first).
        epochs: total epochs (a resumed run continues up to this).
        batch_size: per-worker batch size.
        seed: base seed; each worker adds its rank.
        precision: ``auto`` = bf16 autocast on CUDA, fp32 on CPU.
        accumulate: micro-batches per optimiser step.
        grad_clip: max gradient norm per optimiser step (None: off).
        ema_decay: decay of the EMA copies the stage declares.
        val_every: validate (and report, and checkpoint) every N epochs; the last epoch always.
        max_train_batches / max_val_batches: per-epoch caps (smoke tests).
        shuffle_buffer: rows in the local shuffle buffer of the train stream.
        cache_mb: a worker keeps its rows of a split in memory after the first epoch when they
            take at most this many MiB (and an eighth of the memory available), and later epochs
            skip Ray Data (0: stream every epoch; see ctray.train.split_cache).
        tensorboard_dir: where rank 0 writes TensorBoard events (None: off).
        display_window: the montages' HU display window (``soft_tissue``, ``lung``, ``bone``
            or ``LEVEL/WIDTH``; see ctray.train.montage).
    """

    family: str
    stage: str | None = None
    init_from: str | None = None
    epochs: int = 4
    batch_size: int = 4
    seed: int = 0
    precision: Precision = "auto"
    accumulate: int = 1
    grad_clip: float | None = None
    ema_decay: float = 0.999
    val_every: int = 1
    max_train_batches: int | None = None
    max_val_batches: int | None = None
    shuffle_buffer: int = 64
    cache_mb: float = 1024.0
    tensorboard_dir: str | None = None
    display_window: str = "soft_tissue"

    def __post_init__(self) -> None:
        if self.val_every < 1:
            raise ValueError(f"val_every must be >= 1, got {self.val_every}")
        if not self.cache_mb >= 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb}")
        display_window(self.display_window)

    def validates(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) ends with validation, a report and a checkpoint."""
        return (epoch + 1) % self.val_every == 0 or epoch == self.epochs - 1


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a device: bf16 only where it is asked for (or auto) on CUDA."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        if device.type != "cuda":
            raise ValueError("precision='bf16' needs a CUDA device; use 'auto' or 'fp32' on CPU")
        return torch.bfloat16
    return None


def exported_weights(state: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-module weights to export from a checkpoint: the EMA copy where there is one."""
    return {**state["models"], **state.get("ema", {})}


def _stream(split: str, loop: LoopConfig, seed: int) -> Callable[[torch.device], Iterator[dict]]:
    """The worker's shard of ``split`` as Ray Data batches on a given device."""

    def batches(device: torch.device) -> Iterator[dict]:
        train = split == "train"
        return ray.train.get_dataset_shard(split).iter_torch_batches(
            batch_size=loop.batch_size,
            device=device,
            local_shuffle_buffer_size=loop.shuffle_buffer if train else None,
            local_shuffle_seed=seed if train else None,
        )

    return batches


def cache_budget(cache_mb: float) -> int:
    """Bytes a worker may keep per split: ``cache_mb``, and at most an eighth of the memory
    available when it starts (trials and workers sharing a node each take their own share)."""
    return min(int(cache_mb * 2**20), available_memory() // 8)


def available_memory() -> int:
    """Bytes of memory available for new work (Linux ``MemAvailable``; else physical RAM)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Mean:
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


def _load_init(path: str, spec: FamilySpec, modules: tuple[str, ...], data: DataInfo):
    """Weights of the frozen earlier-stage ``modules`` from an exported model directory."""
    from ctray.modeldir import read_meta, read_weights

    meta = read_meta(path)
    if meta["family"] != spec.name:
        raise ValueError(f"{path}: a {meta['family']!r} model cannot initialise {spec.name!r}")
    missing = [m for m in modules if m not in meta["modules"]]
    if missing:
        raise ValueError(
            f"{path}: lacks module(s) {', '.join(missing)} (it is a {meta.get('stage')!r} export)"
        )
    theirs = DataInfo.from_dict(meta["data"])
    if (theirs.spacing, theirs.window, theirs.output_scale) != (
        data.spacing,
        data.window,
        data.output_scale,
    ):
        raise ValueError(
            f"{path} was trained on other data geometry (spacing {theirs.spacing}, window "
            f"{theirs.window}) than these shards (spacing {data.spacing}, window {data.window})"
        )
    return read_weights(path, modules)


class StageModels:
    """The stage's modules: trained (DDP-wrapped), frozen earlier stages, EMA copies.

    ``bare`` holds the modules themselves and ``wrapped`` what the steps call (a trained
    module's DDP wrapper around the same object: ``prepare_model`` moves it in place).
    """

    def __init__(self, spec: FamilySpec, stage: Stage, cfg: Any, data: DataInfo, loop: LoopConfig):
        built = spec.build_models(cfg, data)
        self.frozen = spec.frozen_modules(stage)
        self.trains = stage.trains
        missing = [m for m in (*self.trains, *self.frozen) if m not in built]
        if missing:
            raise ValueError(f"{spec.name}.build_models() lacks module(s) {missing}")
        self.bare = {k: built[k] for k in (*self.frozen, *self.trains)}
        self.ema = {k: make_ema(self.bare[k], loop.ema_decay) for k in stage.ema}
        self.wrapped: dict[str, nn.Module] = {}

    def freeze_and_place(
        self, device: torch.device, wrap: Callable[[nn.Module], nn.Module]
    ) -> None:
        """Frozen modules: no gradients, eval mode, never DDP (torch's DDP raises on a module
        without trainable parameters). Trained ones go through ``wrap`` (prepare_model: the
        device, and DDP when there is more than one rank)."""
        for name in self.frozen:
            module = self.bare[name].to(device).eval()
            module.requires_grad_(False)
            self.wrapped[name] = module
        for name in self.trains:
            self.wrapped[name] = wrap(self.bare[name])
        for ema in self.ema.values():
            ema.to(device)

    def train_mode(self) -> dict[str, nn.Module]:
        for name in self.trains:
            self.wrapped[name].train()
        return self.wrapped

    def eval_mode(self) -> dict[str, nn.Module]:
        """The models evaluation sees: EMA copies replace their modules."""
        out = dict(self.wrapped)
        for name, ema in self.ema.items():
            out[name] = ema.module
        for m in out.values():
            m.eval()
        return out

    def preview_models(self) -> dict[str, nn.Module]:
        """What a single rank may call on its own: the bare modules (EMA copies where
        evaluation uses them), never a DDP wrapper, whose forward is a collective that the
        other ranks would not join."""
        return {**self.bare, **{name: ema.module for name, ema in self.ema.items()}}

    def update_ema(self) -> None:
        for name, ema in self.ema.items():
            ema.update_parameters(self.bare[name])

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """State dicts of every module, without DDP's ``module.`` prefixes."""
        return {name: module.state_dict() for name, module in self.bare.items()}


Preview = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def validate(
    ctx: StepContext, models: StageModels, stage: Stage, batches: Iterable[dict], *, preview: bool
) -> tuple[dict[str, float], Preview | None]:
    """One validation pass: ``val/`` metrics averaged across workers and, with ``preview``
    (rank 0 when it writes TensorBoard), montage volumes from the first batch.

    Every rank calls the eval models once per ``eval_step``, so DDP's collectives match; the
    preview runs on one rank only and therefore gets :meth:`StageModels.preview_models`.
    """
    ctx.models = models.eval_mode()
    mean = Mean()
    shown = None
    with torch.no_grad():
        for batch in batches:
            for key, values in stage.eval_step(ctx, batch).items():
                mean.add(key, values)
            if preview and shown is None:
                shown = stage.preview(models.preview_models(), batch, ctx.config)
    return {f"val/{k}": v for k, v in mean.result().items()}, shown


def resume_candidates(latest: ray.train.Checkpoint) -> Iterator[ray.train.Checkpoint]:
    """The latest checkpoint, then (only if asked for: it was damaged) the older ones Ray
    Train still keeps, newest first."""
    yield latest
    kept = ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
    )
    older = [r for r in kept if r.checkpoint.path != latest.path]
    older.sort(key=lambda r: r.metrics.get("epoch", -1), reverse=True)
    yield from (r.checkpoint for r in older)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` has ``loop``, ``family_config`` and ``data`` dicts."""
    loop = from_dict(LoopConfig, config["loop"], where="loop config")
    spec: FamilySpec = get_family(loop.family)
    stage = spec.stage(loop.stage)
    family_cfg = from_dict(spec.config_cls, config["family_config"], where=f"{spec.name} config")
    data = DataInfo.from_dict(config["data"])
    rank = ray.train.get_context().get_world_rank()
    seed_everything(loop.seed + rank)
    device = ray.train.torch.get_device()
    dtype = resolve_precision(loop.precision, device)

    def autocast() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    models = StageModels(spec, stage, family_cfg, data, loop)
    frozen = models.frozen
    if frozen and not loop.init_from:
        earlier = ", ".join(s.name for s in spec.earlier(stage))
        raise ValueError(
            f"stage {stage.name!r} of {spec.name} trains on the frozen {earlier} stage: "
            f"pass its export with --init-from DIR (or run all stages: --stage all)"
        )
    optimizers = stage.build_optimizers(family_cfg, {k: models.bare[k] for k in stage.trains})
    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state, resumed = load_resumable(resume_candidates(checkpoint))
        for name, module in models.bare.items():
            module.load_state_dict(state["models"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, ema in models.ema.items():
            ema.module.load_state_dict(state["ema"][name])
            ema.n_averaged.fill_(int(state["ema_count"][name]))
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        if start_epoch >= loop.epochs:
            _report_again(resumed, rank)
            return
        restore_rank_rng(state["rng"], rank, fallback_seed=loop.seed + rank + 7919 * start_epoch)
    else:
        if frozen:
            weights = _load_init(loop.init_from, spec, frozen, data)
            for name in frozen:
                models.bare[name].load_state_dict(weights[name])
        if stage.init is not None:
            stage.init(family_cfg, {k: models.bare[k] for k in stage.trains})
    models.freeze_and_place(device, ray.train.torch.prepare_model)
    optimize = Optimization(
        optimizers, accumulate=loop.accumulate, grad_clip=loop.grad_clip, step=step
    )
    writer = _tensorboard(loop, rank)
    ctx = StepContext(
        models=models.wrapped,
        optimizers=optimizers,
        config=family_cfg,
        data=data,
        stage=stage.name,
        epoch=start_epoch,
        num_epochs=loop.epochs,
        step=step,
        device=device,
        autocast=autocast,
        optimize=optimize,
    )
    budget = cache_budget(loop.cache_mb)
    caches = {
        "train": SplitCache(budget_bytes=budget, shuffle=True, keep_partial=False),
        "val": SplitCache(budget_bytes=budget, shuffle=False, keep_partial=True),
    }

    def batches(split: str, limit: int | None, seed: int) -> Iterator[dict]:
        cache = caches[split]
        first = not cache.decided
        yield from cache.batches(
            _stream(split, loop, seed),
            batch_size=loop.batch_size,
            limit=limit,
            seed=seed,
            device=device,
        )
        if first and cache.decided and rank == 0:
            print(f"[{spec.name}:{stage.name}] {split} data: {cache.reason}", flush=True)

    for epoch in range(start_epoch, loop.epochs):
        started = time.perf_counter()
        ctx.epoch = epoch
        ctx.models = models.train_mode()
        train_mean = Mean()
        shuffle_seed = loop.seed + rank + 7919 * epoch
        for batch in batches("train", loop.max_train_batches, shuffle_seed):
            ctx.step = optimize.step
            for key, value in stage.train_step(ctx, batch).items():
                train_mean.add(key, value)
            optimize.end_batch()
            models.update_ema()
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "epochs_done": epoch + 1,
            "step": optimize.step,
            "epoch_time_s": time.perf_counter() - started,
            "data/train_rows_in_memory": len(caches["train"]),
        }
        metrics.update({f"train/{k}": v for k, v in train_mean.result().items()})
        if not loop.validates(epoch):
            if rank == 0:
                print(
                    f"[{spec.name}:{stage.name}] epoch {epoch + 1}/{loop.epochs} "
                    f"{metrics['epoch_time_s']:.1f}s (no validation)",
                    flush=True,
                )
            continue
        val_metrics, preview = validate(
            ctx,
            models,
            stage,
            batches("val", loop.max_val_batches, 0),
            preview=writer is not None,
        )
        metrics.update(val_metrics)
        metrics["data/val_rows_in_memory"] = len(caches["val"])
        metrics["epoch_time_s"] = time.perf_counter() - started
        if writer is not None:
            _write_tensorboard(
                writer, metrics, preview, epoch, data=data, display=loop.display_window
            )
        if rank == 0:
            shown = {
                k: round(v, 4)
                for k, v in metrics.items()
                if k.startswith("val/") and "roi" not in k and "/" not in k[4:]
            }
            print(
                f"[{spec.name}:{stage.name}] epoch {epoch + 1}/{loop.epochs} "
                f"{metrics['epoch_time_s']:.1f}s {shown}",
                flush=True,
            )
        state = {
            "epoch": epoch,
            "step": optimize.step,
            "models": models.weights(),
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "ema": {k: ema_weights(e) for k, e in models.ema.items()},
            "ema_count": {k: int(e.n_averaged) for k, e in models.ema.items()},
            "rng": all_rng_states(),
        }
        _report(metrics, state, config, rank)
    if writer is not None:
        writer.close()


def _write_tensorboard(
    writer, metrics: dict[str, Any], preview, epoch: int, *, data: DataInfo, display: str
) -> None:
    for key, value in metrics.items():
        if isinstance(value, float) and math.isfinite(value):
            writer.add_scalar(key, value, epoch)
    if preview is not None:
        image = montage(*preview, data=data, display=display)
        writer.add_image("preview/input_output_target", image, epoch, dataformats="HWC")
    writer.flush()


def _report_again(checkpoint: ray.train.Checkpoint, rank: int) -> None:
    """Report a finished run's last result once more, with its checkpoint.

    A run restored after its last epoch trains nothing; without this, its new driver (a Tune
    trial resumed after the Tune driver died between the run's end and recording it) would
    never hear the end and would keep an older result and checkpoint path.
    """
    kept = ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
    )
    metrics = next(r.metrics for r in kept if r.checkpoint.path == checkpoint.path)
    if rank != 0:
        ray.train.report(metrics)
        return
    ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False)


def _report(metrics: dict[str, Any], state: dict[str, Any], config: dict[str, Any], rank: int):
    """Report metrics; rank 0 attaches a checkpoint written completely before it is handed over."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ctray-ckpt-") as tmp:
        write_checkpoint(tmp, state, config)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
