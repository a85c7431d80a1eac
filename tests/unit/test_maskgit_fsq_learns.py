"""maskgit_fsq's transformer must learn: on a frozen tokenizer, a short CPU training of stage 2
moves organ HU towards the simulated phase and beats the identity.

The untrained transformer is the identity: its learned bonus on the source's own code keeps
every token, and the ``source_delta`` output of unchanged tokens is the source itself (checked
below). So every gain over the identity comes from training.

Measured when this test was written (6 phantoms at 4 mm, 16^3 patches, native -> arterial /
venous, tokenizer [8, 16] with 8^3 tokens trained 6 epochs, transformer 30 epochs of batch 4):
untrained 75.5 / 40.6 / 25.2 HU organ / balanced / body MAE, exactly the identity's; trained
69.5 / 38.5 / 24.4. The thresholds below sit at about half of those gains.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctray.config import from_dict
from ctray.data.build import BuildConfig
from ctray.data.shards import column_numpy, read_split
from ctray.families.maskgit_fsq.config import MaskGITFSQConfig
from ctray.families.maskgit_fsq.spec import SPEC
from ctray.families.maskgit_fsq.steps import generate
from ctray.registry import DataInfo, Stage, StepContext
from ctray.train.local import local_context

BUILD = BuildConfig(
    patch_size=(16, 16, 16), spacing=(4.0, 4.0, 4.0), patches_per_subject=8, val_fraction=0.34
)
OPTIONS = {"source_phases": ["native"], "target_phases": ["arterial", "venous"]}
TOKENIZER_EPOCHS, TRANSFORMER_EPOCHS, BATCH = 6, 30, 4
SHOWN = ("organ_mae_hu", "balanced_mae_hu", "mae_hu")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataInfo, dict, dict]:
    out = tmp_path_factory.mktemp("maskgit_learns")
    manifest = SPEC.build_shards(out=out, phantom=6, config=BUILD, options=OPTIONS, progress=False)
    train, val = (
        {c: torch.as_tensor(np.array(column_numpy(t[c]))) for c in SPEC.columns}
        for t in (read_split(out, s, SPEC.columns) for s in ("train", "val"))
    )
    return DataInfo.from_manifest(manifest), train, val


def _fit(ctx: StepContext, stage: Stage, train: dict, epochs: int) -> None:
    generator = torch.Generator().manual_seed(0)
    rows = train["source"].shape[0]
    ctx.num_epochs = epochs
    for epoch in range(epochs):
        ctx.epoch = epoch
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, BATCH):
            ctx.step = ctx.optimize.step
            stage.train_step(ctx, {k: v[order[start : start + BATCH]] for k, v in train.items()})
            ctx.optimize.end_batch()


def _evaluate(ctx: StepContext, stage: Stage, val: dict) -> dict[str, float]:
    for module in ctx.models.values():
        module.eval()
    with torch.no_grad():
        out = {k: float(v.nanmean()) for k, v in stage.eval_step(ctx, val).items()}
    for name in stage.trains:
        ctx.models[name].train()
    return out


def test_transformer_training_beats_the_identity(data) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    info, train, val = data
    config = from_dict(
        MaskGITFSQConfig,
        {
            **SPEC.preset("debug"),
            "tok_channels": [8, 16],
            "adv_weight": 0.0,
            "lr_transformer": 5e-3,
        },
    )
    assert config.source_copy > 0, "the default must start the transformer as the identity"
    tok_stage, stage = SPEC.stage("tokenizer"), SPEC.stage("maskgit")
    tok_ctx = local_context(SPEC, config, info, stage="tokenizer", grad_clip=1.0)
    _fit(tok_ctx, tok_stage, train, TOKENIZER_EPOCHS)
    transformer = SPEC.build_models(config, info)["transformer"]
    models = {"tokenizer": tok_ctx.models["tokenizer"], "transformer": transformer}
    ctx = local_context(SPEC, config, info, stage="maskgit", models=models, grad_clip=1.0)

    before = _evaluate(ctx, stage, val)
    for key in SHOWN:
        assert before[key] == pytest.approx(before[f"identity_{key}"], rel=1e-3), before
    _fit(ctx, stage, train, TRANSFORMER_EPOCHS)
    after = _evaluate(ctx, stage, val)
    shown = {k: (round(after[k], 2), round(after[f"identity_{k}"], 2)) for k in SHOWN}
    assert after["organ_mae_hu"] <= 0.96 * after["identity_organ_mae_hu"], shown
    assert after["balanced_mae_hu"] <= 0.98 * after["identity_balanced_mae_hu"], shown
    assert after["mae_hu"] < after["identity_mae_hu"], shown


def test_an_untrained_transformer_keeps_every_source_token(data) -> None:
    """The copy bonus makes the untrained model the identity: every decoded token is the
    source's and the output is the source voxel for voxel."""
    torch.manual_seed(0)
    info, _, val = data
    x = val["source"][:4].float().unsqueeze(1)
    phase = val["target_phase"][:4].long()
    config = from_dict(MaskGITFSQConfig, SPEC.preset("debug"))
    models = SPEC.build_models(config, info)
    for module in models.values():
        module.eval()
    out = generate(models, x, phase, config, steps=config.sample_steps, temperature=0.0)
    assert torch.equal(out["tokens"], out["source_tokens"])
    torch.testing.assert_close(out["source_delta"], x)
