"""The trained phase GAN must beat the identity on what contrast changes (issue 7).

A short CPU run on tiny phantom shards (native -> arterial / venous, the target registered onto
the source by the builder), trained in-process with the family's own steps (about 30 s on one
core): the validation organ mean-HU errors of the trained model must be well below the
identity's, and its whole-body MAE below the identity's. An untrained generator is the
identity, so a change that stops the generator from learning the enhancement fails here.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from ctray.config import from_dict, replace
from ctray.data.build import BuildConfig
from ctray.data.shards import column_numpy, load_manifest, read_split
from ctray.families.phase_gan.data import build
from ctray.registry import DataInfo, get_family
from ctray.train.local import local_context

SPEC = get_family("phase_gan")
COLUMNS = ("source", "target", "truth", "labels", "source_phase", "target_phase")
# Organs whose enhancement a model can predict from a native source. The liver is left out
# here: its enhanced HU is the table value times a per-subject factor (+-20 %) that a native
# scan does not show, and with this test's one validation subject that draw decides the ratio
# (measured 0.94-1.08 over seeds). The demo's validation (6 subjects) reports the liver.
ORGANS = ("aorta", "portal_vein", "kidney", "spleen")
EPOCHS = 9  # 1 detector pre-training + 8 generator epochs
BATCH = 4
# Measured over seeds 0-1 (model / identity): aorta 0.47-0.54, portal vein 0.28-0.30, kidney
# 0.46-0.49, spleen 0.33-0.38 (mean 0.40-0.41), whole-body MAE 0.86-0.88, balanced MAE
# 0.65-0.67, aorta per target phase <= 0.61. The bounds leave room for run-to-run variation,
# not for a generator that learns nothing (ratio 1).
MAX_ORGAN_RATIO = 0.75
MAX_MEAN_ORGAN_RATIO = 0.6
MAX_MAE_RATIO = 0.95


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("learns")
    config = BuildConfig(patch_size=(16, 16, 16), spacing=(6.0, 6.0, 6.0), patches_per_subject=32)
    options = {"source_phases": ["native"], "target_phases": ["arterial", "venous"]}
    build(out=out, phantom=4, config=config, options=options, progress=False)
    return out


def _rows(root, split: str) -> dict[str, torch.Tensor]:
    table = read_split(root, split, COLUMNS)
    return {c: torch.from_numpy(np.array(column_numpy(table[c]))) for c in COLUMNS}


def _batches(rows: dict[str, torch.Tensor], order: np.ndarray):
    for i in range(0, len(order), BATCH):
        idx = torch.from_numpy(order[i : i + BATCH])
        yield {k: v[idx] for k, v in rows.items()}


def _validate(ctx, rows) -> dict[str, float]:
    sums, counts = defaultdict(float), defaultdict(float)
    for m in ctx.models.values():
        m.eval()
    with torch.no_grad():
        for batch in _batches(rows, np.arange(len(rows["source"]))):
            for key, values in SPEC.final.eval_step(ctx, batch).items():
                v = values.double()
                ok = torch.isfinite(v)
                sums[key] += float(v[ok].sum())
                counts[key] += float(ok.sum())
    return {k: sums[k] / counts[k] if counts[k] else math.nan for k in sums}


@pytest.fixture(scope="module")
def trained(shards):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        data = DataInfo.from_manifest(load_manifest(shards))
        cfg = replace(from_dict(SPEC.config_cls, SPEC.preset("debug")), {"gd_epochs": 8})
        ctx = local_context(SPEC, cfg, data, num_epochs=EPOCHS)
        train, val = _rows(shards, "train"), _rows(shards, "val")
        before = _validate(ctx, val)
        for epoch in range(EPOCHS):
            ctx.epoch = epoch
            for m in ctx.models.values():
                m.train()
            for batch in _batches(train, rng.permutation(len(train["source"]))):
                ctx.step = ctx.optimize.step
                SPEC.final.train_step(ctx, batch)
                ctx.optimize.end_batch()
        return before, _validate(ctx, val)
    finally:
        torch.set_num_threads(threads)


def test_untrained_generator_is_the_identity(trained) -> None:
    before, _ = trained
    for organ in ORGANS:
        key = f"roi_{organ}_hu"
        assert before[key] == pytest.approx(before[f"identity_{key}"], rel=1e-6)


def test_training_beats_the_identity_on_every_organ(trained) -> None:
    _, after = trained
    ratios = {o: after[f"roi_{o}_hu"] / after[f"identity_roi_{o}_hu"] for o in ORGANS}
    assert all(math.isfinite(r) for r in ratios.values()), ratios
    assert max(ratios.values()) < MAX_ORGAN_RATIO, ratios
    assert np.mean(list(ratios.values())) < MAX_MEAN_ORGAN_RATIO, ratios
    assert after["mae_hu"] < MAX_MAE_RATIO * after["identity_mae_hu"]
    assert after["balanced_mae_hu"] < MAX_MAE_RATIO * after["identity_balanced_mae_hu"]
    # per target phase, too
    for phase in ("arterial", "venous"):
        key = f"{phase}/roi_aorta_hu"
        assert after[key] < MAX_ORGAN_RATIO * after[f"{phase}/identity_roi_aorta_hu"]
