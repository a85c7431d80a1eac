"""The family contract without Ray: stages, frozen modules, optimisation, EMA, RNG resume."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ctray.config import from_dict
from ctray.registry import DataInfo, FamilySpec, Stage, get_family
from ctray.train.local import local_context
from ctray.train.loop import LoopConfig, StageModels, exported_weights
from ctray.train.optimization import Optimization
from ctray.train.state import (
    all_rng_states,
    ema_decay_at,
    ema_weights,
    make_ema,
    restore_rank_rng,
    rng_state,
    set_rng_state,
)

DATA = DataInfo(patch_size=(4, 4, 4), spacing=(1.0, 1.0, 1.0), window={"lo": -1000, "hi": 1000})


def _linear_step(ctx, batch):
    loss = ctx.models["head"](ctx.models["body"](batch["x"])).pow(2).mean()
    ctx.optimize(loss, "head")
    return {"loss": float(loss.detach())}


def _body_step(ctx, batch):
    loss = ctx.models["body"](batch["x"]).pow(2).mean()
    ctx.optimize(loss, "body")
    return {"loss": float(loss.detach())}


def _sgd(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=0.1)


def _no_eval(ctx, batch):
    return {}


def _spec() -> FamilySpec:
    """A two-stage toy family: stage 'first' trains body, 'second' trains head on it."""
    common = {
        "eval_step": _no_eval,
        "preview": lambda m, b, c: (None, None, None),
        "metric": "loss",
        "mode": "min",
    }
    return FamilySpec(
        name="toy",
        description="toy",
        config_cls=LoopConfig,
        build_models=lambda cfg, data: {"body": nn.Linear(3, 3), "head": nn.Linear(3, 1)},
        stages=(
            Stage(
                name="first",
                trains=("body",),
                build_optimizers=lambda c, m: {
                    "body": torch.optim.SGD(m["body"].parameters(), 0.1)
                },
                train_step=_body_step,
                inference_models=("body",),
                **common,
            ),
            Stage(
                name="second",
                trains=("head",),
                build_optimizers=lambda c, m: {
                    "head": torch.optim.SGD(m["head"].parameters(), 0.1)
                },
                train_step=_linear_step,
                inference_models=("body", "head"),
                ema=("head",),
                **common,
            ),
        ),
        predict=lambda m, x, c, cond: x,
        build_shards=lambda **kw: None,
        columns=("x",),
    )


def test_stage_lookup_errors_list_valid_names() -> None:
    spec = _spec()
    assert spec.final.name == "second"
    assert spec.frozen_modules(spec.stage("second")) == ("body",)
    assert spec.frozen_modules(spec.stage("first")) == ()
    with pytest.raises(KeyError, match="valid stages: first, second"):
        spec.stage("diffusion")
    with pytest.raises(ValueError, match="pick one of: first, second"):
        spec.stage(None)
    assert get_family("phase_gan").stage(None).name == "train"
    with pytest.raises(ValueError, match="EMA of untrained"):
        Stage(**{**spec.final.__dict__, "ema": ("body",)})


@pytest.fixture(scope="module")
def gloo():
    """A one-process gloo group, so DDP wrapping can be exercised without Ray."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_frozen_stage_is_not_ddp_wrapped_and_unchanged_by_training(gloo) -> None:
    spec = _spec()
    stage = spec.stage("second")
    loop = LoopConfig(family="toy", stage="second", ema_decay=0.5)
    models = StageModels(spec, stage, loop, DATA, loop)
    # torch refuses to wrap a module without trainable parameters: why frozen ones skip DDP.
    with pytest.raises(RuntimeError, match="doesn't have any parameter that requires"):
        DistributedDataParallel(nn.Linear(2, 2).requires_grad_(False))
    models.freeze_and_place(torch.device("cpu"), DistributedDataParallel)
    assert isinstance(models.wrapped["head"], DistributedDataParallel)
    assert not isinstance(models.wrapped["body"], DistributedDataParallel)
    assert not models.wrapped["body"].training
    body_before = {k: v.clone() for k, v in models.bare["body"].state_dict().items()}
    head_before = {k: v.clone() for k, v in models.bare["head"].state_dict().items()}
    ctx = local_context(
        spec,
        loop,
        DATA,
        stage="second",
        models=models.train_mode(),
        optimizers=stage.build_optimizers(loop, {"head": models.bare["head"]}),
    )
    for _ in range(3):
        stage.train_step(ctx, {"x": torch.randn(8, 3)})
        models.update_ema()
    assert not models.wrapped["body"].training, "train mode must not wake a frozen module"
    for k, v in models.bare["body"].state_dict().items():
        assert torch.equal(v, body_before[k]), f"frozen body.{k} changed"
    assert any(
        not torch.equal(v, head_before[k]) for k, v in models.bare["head"].state_dict().items()
    )
    # Evaluation sees the EMA copy, which lags the trained weights.
    seen = models.eval_mode()["head"]
    assert seen is models.ema["head"].module
    assert not torch.equal(seen.weight, models.bare["head"].weight)


def test_optimization_accumulates_and_clips() -> None:
    w = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=1.0)
    optimize = Optimization({"w": opt}, accumulate=2, grad_clip=0.5)
    target = torch.tensor([10.0, 0.0, 0.0])
    assert optimize((w - target).pow(2).sum(), "w") is False
    assert torch.equal(w.detach(), torch.zeros(3)), "stepped inside an accumulation window"
    optimize.end_batch()
    assert optimize.step == 0
    assert optimize((w - target).pow(2).sum(), "w") is True
    optimize.end_batch()
    assert optimize.step == 1
    # mean gradient (-20, 0, 0) clipped to norm 0.5
    np.testing.assert_allclose(w.detach().numpy(), [0.5, 0.0, 0.0], atol=1e-6)
    assert optimize.last_grad_norm["w"] == pytest.approx(20.0)
    with pytest.raises(KeyError, match="optimiser names from: w"):
        optimize(w.sum(), "g")


def test_optimization_drops_gradients_other_losses_left() -> None:
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    optimize = Optimization({"w": opt})
    (w * 100.0).sum().backward()  # e.g. a generator loss back-propagated through D
    optimize((w * 1.0).sum(), "w")
    assert float(w) == pytest.approx(-1.0)


def test_rng_state_round_trips_through_a_weights_only_checkpoint() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = rng_state()
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(2))
    buffer = io.BytesIO()
    torch.save({"rng": [state]}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["rng"]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert restore_rank_rng(loaded, 0, fallback_seed=5) is True
    got = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(2))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])
    # A rank the checkpoint has no state for is reseeded, deterministically.
    assert restore_rank_rng(loaded, 3, fallback_seed=5) is False
    first = torch.rand(1)
    restore_rank_rng(loaded, 3, fallback_seed=5)
    assert torch.equal(first, torch.rand(1))
    set_rng_state(all_rng_states()[0])  # one process: a list of one


def test_ema_update_and_checkpoint_round_trip() -> None:
    module = nn.Linear(2, 1)
    ema = make_ema(module, 0.9)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema.update_parameters(module)  # first update copies
    with torch.no_grad():
        module.weight.fill_(2.0)
    ema.update_parameters(module)
    # Second update: warmed-up decay min(0.9, 2 / 11).
    expected = torch.full((1, 2), 1.0 * (2 / 11) + 2.0 * (9 / 11))
    torch.testing.assert_close(ema.module.weight, expected)
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.999, 10**6) == 0.999
    state = {"models": {"m": module.state_dict()}, "ema": {"m": ema_weights(ema)}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = exported_weights(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored["m"]["weight"], expected)
    with pytest.raises(ValueError, match="ema_decay"):
        make_ema(module, 1.0)


def test_ema_copies_integer_buffers_instead_of_averaging_them() -> None:
    """An averaged integer is truncated back to an integer: an FSQ basis 200 became 199 in the
    EMA copy (so its codes were garbage) and BatchNorm's batch counter drifted."""
    module = nn.BatchNorm1d(2)
    module.register_buffer("table", torch.tensor([1, 8, 40, 200]))
    ema = make_ema(module, 0.995)
    for _ in range(20):
        module(torch.randn(4, 2))
        ema.update_parameters(module)
    assert torch.equal(ema.module.table, module.table)
    assert int(ema.module.num_batches_tracked) == int(module.num_batches_tracked) == 20
    assert not torch.equal(ema.module.running_mean, module.running_mean)  # floats: averaged


def test_loop_config_validation_schedule() -> None:
    loop = from_dict(LoopConfig, {"family": "toy", "epochs": 5, "val_every": 2})
    assert [e for e in range(5) if loop.validates(e)] == [1, 3, 4]
    with pytest.raises(ValueError, match="val_every"):
        LoopConfig(family="toy", val_every=0)


def test_data_options_that_are_model_settings_follow_the_shards() -> None:
    from ctray.tune.runner import data_bound_options

    spec = get_family("xray2ct")
    build = {"family_options": {"beam": "parallel", "rendered_angles": [0, 90], "photons": 1e4}}
    # Geometry is both a data option and a model setting: the model takes the shards' value;
    # options that only shape the data stay out of the model config.
    assert data_bound_options(spec, build) == {"beam": "parallel"}
    assert data_bound_options(spec, {}) == {}
