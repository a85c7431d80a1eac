"""A step context without Ray: for unit tests and quick in-process experiments on one device.

The same Optimization the loop uses (accumulation, clipping, global step), no DDP, no Ray.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ctray.registry import DataInfo, FamilySpec, Models, Optimizers, StepContext
from ctray.train.optimization import Optimization


def local_context(
    spec: FamilySpec,
    config: Any,
    data: DataInfo,
    *,
    stage: str | None = None,
    models: Models | None = None,
    optimizers: Optimizers | None = None,
    epoch: int = 0,
    num_epochs: int = 1,
    accumulate: int = 1,
    grad_clip: float | None = None,
    device: torch.device | str = "cpu",
) -> StepContext:
    """A StepContext for ``stage`` with freshly built (or the given) models and optimisers.

    Earlier stages' modules are frozen and in eval mode, as the loop would have them.
    """
    trained = spec.stage(stage) if stage or len(spec.stages) > 1 else spec.stages[0]
    device = torch.device(device)
    if models is None:
        built = spec.build_models(config, data)
        models = {k: built[k] for k in (*spec.frozen_modules(trained), *trained.trains)}
    for name in spec.frozen_modules(trained):
        models[name].requires_grad_(False)
        models[name].eval()
    for module in models.values():
        module.to(device)
    if optimizers is None:
        optimizers = trained.build_optimizers(config, {k: models[k] for k in trained.trains})
    return StepContext(
        models=models,
        optimizers=optimizers,
        config=config,
        data=data,
        stage=trained.name,
        epoch=epoch,
        num_epochs=num_epochs,
        step=0,
        device=device,
        autocast=contextlib.nullcontext,
        optimize=Optimization(optimizers, accumulate=accumulate, grad_clip=grad_clip),
    )
